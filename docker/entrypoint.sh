#!/usr/bin/env bash
# Entrypoint of the CareFL images:  carefl-entrypoint ROLE [extra flags for the Flower command]
#
#   superlink  flower-superlink: TLS, SuperNode authentication, database on /state
#   serverapp  flower-superexec that runs the ServerApp for every submitted run
#   supernode  flower-supernode for one hospital; the ClientApp runs as its subprocess
#   register   register every /certs/supernodes/*.pub with the SuperLink (one-shot)
#   launch     wait for the hospitals, `flwr run /app --stream`, check the final status
#   init       (as root) make missing certificates/keys and fix ownership (one-shot)
#   gen-certs  docker/gen_certs.py with your arguments
#   anything else is executed as a command (e.g. `bash`, `flwr ls`)
#
# Every setting is an environment variable with a default that matches compose.yaml; the
# table is in docker/README.md. TLS is always on: there is no insecure mode.
set -euo pipefail

role="${1:-${CAREFL_ROLE:-}}"
[ $# -gt 0 ] && shift
tools=/opt/carefl-docker
CA_CERT="${CAREFL_CA_CERT:-/certs/ca.crt}"
SUPERLINK="${CAREFL_SUPERLINK:-superlink:8000}"
APP_UID="$(id -u app 2>/dev/null || echo 49999)"
APP_GID="$(id -g app 2>/dev/null || echo 49999)"

die() { echo "carefl-entrypoint($role): $*" >&2; exit 64; }
need_file() { [ -r "$1" ] || die "$2 not readable at $1 ($3)"; }
mark_role() { echo "$1" > /tmp/carefl-role 2>/dev/null || true; }

case "$role" in
superlink)
    mark_role superlink
    need_file "$CA_CERT" "CA certificate" "mount the consortium certs folder at /certs"
    cert="${CAREFL_SUPERLINK_CERT:-/certs/superlink.crt}"
    key="${CAREFL_SUPERLINK_KEY:-/keys/superlink.key}"
    need_file "$cert" "SuperLink certificate" "run the init service or docker/gen_certs.py"
    need_file "$key" "SuperLink private key" "mount keys/superlink at /keys"
    db="${CAREFL_DATABASE:-/state/superlink.db}"
    mkdir -p "$(dirname "$db")"
    set -x
    exec flower-superlink \
        --isolation process \
        --host "${CAREFL_HOST:-0.0.0.0}" --port "${CAREFL_PORT:-8000}" \
        --ssl-ca-certfile "$CA_CERT" --ssl-certfile "$cert" --ssl-keyfile "$key" \
        --enable-supernode-auth \
        --database "$db" \
        --disable-runtime-dependency-installation \
        "$@"
    ;;
serverapp)
    mark_role serverapp
    need_file "$CA_CERT" "CA certificate" "mount the consortium certs folder at /certs"
    export FLWR_HOME="${FLWR_HOME:-/tmp/flwr}"   # installed FABs; works under any --user
    umask 0002
    set -x
    exec flower-superexec \
        --runtime-api-address "$SUPERLINK" \
        --root-certificates "$CA_CERT" \
        --health-server-address "${CAREFL_HEALTH_ADDRESS:-127.0.0.1:9098}" \
        "$@"
    ;;
supernode)
    mark_role supernode
    hospital="${CAREFL_HOSPITAL:-}"
    [ -n "$hospital" ] || die "set CAREFL_HOSPITAL to this hospital's name (e.g. st-mary)"
    need_file "$CA_CERT" "CA certificate" "mount the consortium's ca.crt at $CA_CERT"
    node_key="${CAREFL_NODE_KEY:-/keys/supernode.key}"
    need_file "$node_key" "SuperNode private key" "mount this hospital's key folder at /keys"
    # Node config read by the ClientApp (see client_app/): hospital, state-dir, data-path,
    # epsilon-cap, delta, site-policy. Strings are quoted, numbers are not.
    node_config="hospital=\"$hospital\" state-dir=\"${CAREFL_STATE_DIR:-/state}\""
    [ -n "${CAREFL_DATA_PATH:-}" ] && node_config+=" data-path=\"$CAREFL_DATA_PATH\""
    [ -n "${CAREFL_EPSILON_CAP:-}" ] && node_config+=" epsilon-cap=$CAREFL_EPSILON_CAP"
    [ -n "${CAREFL_DELTA:-}" ] && node_config+=" delta=$CAREFL_DELTA"
    [ -n "${CAREFL_SITE_POLICY:-}" ] && node_config+=" site-policy=\"$CAREFL_SITE_POLICY\""
    [ -n "${CAREFL_NODE_CONFIG:-}" ] && node_config+=" $CAREFL_NODE_CONFIG"
    # The SuperNode <-> ClientApp Runtime API stays on loopback inside this container; it
    # still uses TLS, with a throw-away CA made now that never leaves the container.
    runtime_tls=/tmp/carefl-runtime
    rm -rf "$runtime_tls"
    python "$tools/gen_certs.py" --ephemeral-runtime "$runtime_tls" >/dev/null
    export FLWR_HOME="${FLWR_HOME:-/tmp/flwr}"
    set -x
    exec flower-supernode \
        --superlink "$SUPERLINK" \
        --root-certificates "$CA_CERT" \
        --auth-supernode-private-key "$node_key" \
        --node-config "$node_config" \
        --isolation subprocess \
        --host 127.0.0.1 --port "${CAREFL_RUNTIME_PORT:-9094}" \
        --ssl-certfile "$runtime_tls/runtime.crt" --ssl-keyfile "$runtime_tls/runtime.key" \
        --ssl-ca-certfile "$runtime_tls/ca.crt" \
        "$@"
    ;;
register)
    mark_role register
    exec python "$tools/launch.py" register "$@"
    ;;
launch)
    mark_role launch
    exec python "$tools/launch.py" run "$@"
    ;;
init)
    mark_role init
    [ "$(id -u)" = 0 ] || die "init must run as root (it fixes file ownership); compose sets user: \"0:0\""
    certs=/certs keys=/keys
    python "$tools/gen_certs.py" --certs "$certs" --keys "$keys" \
        --superlink-names "${CAREFL_SUPERLINK_NAMES:-superlink,localhost,127.0.0.1}" \
        --hospitals "${CAREFL_HOSPITALS:-st-mary,riverside,northfield}" "$@"
    # Public keys in one place for `register`; private keys readable only by the app user.
    mkdir -p "$certs/supernodes"
    for pub in "$keys"/*/supernode.pub; do
        [ -e "$pub" ] || continue
        name="$(basename "$(dirname "$pub")")"
        cp "$pub" "$certs/supernodes/$name.pub"
    done
    chmod -R a+rX "$certs"
    for dir in "$keys"/*/; do
        [ "$(basename "$dir")" = ca ] && continue   # the CA key is for the operator only
        chown -R "$APP_UID:$APP_GID" "$dir"; chmod 0700 "$dir"; chmod 0600 "$dir"*
    done
    # Results are written by the ServerApp runtime as ${CAREFL_UID}:${CAREFL_GID}. A folder
    # Docker just created (root-owned) is handed to that user; a folder you own keeps its
    # owner and gets group write for the runtime's group.
    if [ -d /outputs ]; then
        out_uid="${CAREFL_UID:-$APP_UID}" out_gid="${CAREFL_GID:-$APP_GID}"
        if [ "$(stat -c %u /outputs)" = 0 ]; then
            chown "$out_uid:$out_gid" /outputs
        elif [ "$(stat -c %u /outputs)" != "$out_uid" ]; then
            chgrp "$out_gid" /outputs && chmod g+rwxs /outputs
        fi
    fi
    echo "init: certificates in /certs, keys in /keys, outputs writable"
    ;;
gen-certs)
    exec python "$tools/gen_certs.py" "$@"
    ;;
"")
    die "no role given (superlink | serverapp | supernode | register | launch | init | gen-certs)"
    ;;
*)
    exec "$role" "$@"
    ;;
esac
