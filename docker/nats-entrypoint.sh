#!/bin/sh
# Start nats-server with one of the d8-mesh configs (hub, leaf or cluster).
#
# nats-server takes an empty variable as an empty password, which would leave a role open.
# So this refuses to start while a password the config uses is unset, empty or short.
# Extra arguments go to nats-server (`-t` checks the config and exits).
set -eu

role="${1:-}"
if [ "$#" -gt 0 ]; then
    shift
fi
config_dir="${D8_NATS_CONFIG_DIR:-/etc/d8/nats}"
min_length="${D8_MIN_PASSWORD_LENGTH:-16}"

case "$role" in
    hub) required="D8_NATS_STORE_DIR D8_ORCHESTRATOR_PASSWORD D8_WORKER_PASSWORD D8_CLIENT_PASSWORD D8_LEAF_PASSWORD" ;;
    cluster) required="D8_NATS_STORE_DIR D8_ORCHESTRATOR_PASSWORD D8_WORKER_PASSWORD D8_CLIENT_PASSWORD D8_LEAF_PASSWORD D8_ROUTE_PASSWORD D8_NODE_NAME D8_ROUTE_1 D8_ROUTE_2 D8_ROUTE_3" ;;
    leaf) required="D8_WORKER_PASSWORD D8_NODE_NAME D8_HUB_LEAF_URL" ;;
    *)
        echo "nats-entrypoint: give the config to run: hub, leaf or cluster (got '${role}')" >&2
        exit 2
        ;;
esac

for name in $required; do
    value="$(printenv "$name" || true)"
    if [ -z "$value" ]; then
        echo "nats-entrypoint: ${name} is not set: put it in .env (\`d8 setup\` writes one)" >&2
        exit 2
    fi
    case "$name" in
        *_PASSWORD)
            if [ "${#value}" -lt "$min_length" ]; then
                echo "nats-entrypoint: ${name} is shorter than ${min_length} characters" >&2
                exit 2
            fi
            ;;
    esac
done

exec nats-server -c "${config_dir}/${role}.conf" "$@"
