#!/usr/bin/env bash
# Entrypoint of the CareFL images:  carefl-entrypoint ROLE [extra flags for the Flower command]
#
#   superlink      flower-superlink: TLS, SuperNode authentication, SuperExec secret,
#                  database on /state; Fleet + Control + Runtime APIs on one listener, so
#                  it belongs on the consortium's control network only
#   fleet-gateway  the hospitals' only door: passes the Fleet API to the SuperLink, nothing
#                  else (docker/fleet_gateway.py)
#   app-registry   serves signed app bundles to the SuperLink (docker/app_registry.py)
#   serverapp      flower-superexec that runs the ServerApp for every submitted run
#   supernode      flower-supernode for one hospital; runs only app bundles signed by a key
#                  in its trusted entities; the ClientApp runs as its subprocess
#   register       register every /certs/supernodes/*.pub with the SuperLink (one-shot)
#   launch         wait for the hospitals, sign + publish the app, `flwr run @carefl/...
#                  --stream`, check the final status
#   flwr           any `flwr` command against the SuperLink (e.g. `flwr ls consortium`)
#   init           (as root) make missing certificates/keys/secret, create the hospitals'
#                  state folders, fix ownership (one-shot)
#   gen-certs      docker/gen_certs.py with your arguments
#   anything else is executed as a command (e.g. `bash`)
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
# TOML values of the node config: a float/int, or a string without quotes or backslashes.
is_number() { [[ "$1" =~ ^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; }
is_plain() { [[ -n "$1" && "$1" != *[\"\\]* && "$1" != *$'\n'* ]]; }

case "$role" in
superlink)
    mark_role superlink
    need_file "$CA_CERT" "CA certificate" "mount the consortium certs folder at /certs"
    cert="${CAREFL_SUPERLINK_CERT:-/certs/superlink.crt}"
    key="${CAREFL_SUPERLINK_KEY:-/keys/superlink.key}"
    secret="${CAREFL_SUPEREXEC_SECRET:-/keys/superexec.secret}"
    need_file "$cert" "SuperLink certificate" "run the init service or docker/gen_certs.py"
    need_file "$key" "SuperLink private key" "mount keys/superlink at /keys"
    need_file "$secret" "SuperExec secret" "run the init service (keys/superlink/superexec.secret)"
    db="${CAREFL_DATABASE:-/state/superlink.db}"
    mkdir -p "$(dirname "$db")"
    # Runs are started by app name only from the consortium's registry (signed bundles);
    # Flower fetches them from $FLWR_SUPERGRID_API_URL, over TLS checked against our CA.
    export FLWR_SUPERGRID_API_URL="${CAREFL_REGISTRY_URL:-https://app-registry:8443}/v1"
    export REQUESTS_CA_BUNDLE="$CA_CERT"
    set -x
    exec flower-superlink \
        --isolation process \
        --host "${CAREFL_HOST:-0.0.0.0}" --port "${CAREFL_PORT:-8000}" \
        --ssl-ca-certfile "$CA_CERT" --ssl-certfile "$cert" --ssl-keyfile "$key" \
        --enable-supernode-auth \
        --superexec-auth-secret-file "$secret" \
        --database "$db" \
        --disable-runtime-dependency-installation \
        "$@"
    ;;
fleet-gateway)
    mark_role fleet-gateway
    need_file "$CA_CERT" "CA certificate" "mount the consortium certs folder at /certs"
    need_file "${CAREFL_GATEWAY_CERT:-/certs/fleet-gateway.crt}" "gateway certificate" "run the init service"
    need_file "${CAREFL_GATEWAY_KEY:-/keys/fleet-gateway.key}" "gateway private key" "mount keys/fleet-gateway at /keys"
    exec python "$tools/fleet_gateway.py" "$@"
    ;;
app-registry)
    mark_role app-registry
    need_file "${CAREFL_REGISTRY_CERT:-/certs/app-registry.crt}" "registry certificate" "run the init service"
    need_file "${CAREFL_REGISTRY_KEY:-/keys/app-registry.key}" "registry private key" "mount keys/app-registry at /keys"
    exec python "$tools/app_registry.py" serve "$@"
    ;;
serverapp)
    mark_role serverapp
    need_file "$CA_CERT" "CA certificate" "mount the consortium certs folder at /certs"
    export FLWR_HOME="${FLWR_HOME:-/tmp/flwr}"   # installed FABs; works under any --user
    secret="${CAREFL_SUPEREXEC_SECRET:-/keys/superexec.secret}"
    need_file "$secret" "SuperExec secret" "mount keys/serverapp at /keys (made by the init service)"
    umask 0002
    set -x
    exec flower-superexec \
        --runtime-api-address "$SUPERLINK" \
        --root-certificates "$CA_CERT" \
        --superexec-auth-secret-file "$secret" \
        --health-server-address "${CAREFL_HEALTH_ADDRESS:-127.0.0.1:9098}" \
        "$@"
    ;;
supernode)
    mark_role supernode
    hospital="${CAREFL_HOSPITAL:-}"
    is_plain "$hospital" || die "set CAREFL_HOSPITAL to this hospital's name (e.g. st-mary)"
    need_file "$CA_CERT" "CA certificate" "mount the consortium's ca.crt at $CA_CERT"
    node_key="${CAREFL_NODE_KEY:-/keys/supernode.key}"
    need_file "$node_key" "SuperNode private key" "mount this hospital's key folder at /keys"
    trusted="${CAREFL_TRUSTED_ENTITIES:-/certs/trusted-entities.yaml}"
    need_file "$trusted" "trusted entities (the consortium's app-signing public key)" \
        "mount the consortium's trusted-entities.yaml at $trusted"
    # Node config read by the ClientApp (carefl/site.py): this hospital's own policy. The
    # server cannot fill in what is missing here, so the privacy-relevant keys are required
    # (a site-policy file may hold them instead). Strings are quoted, numbers are not.
    data="${CAREFL_DATA_PATH:-}" eps="${CAREFL_EPSILON_CAP:-}" delta="${CAREFL_DELTA:-}"
    policy="${CAREFL_SITE_POLICY:-}" require_dp="${CAREFL_REQUIRE_DP:-}"
    if [ -z "$policy" ]; then
        [ -n "$data" ] || die "set CAREFL_DATA_PATH: this hospital's data under /data (e.g. /data/dataset.json), or synthetic:<i> for the demo's generated data"
        [ -n "$eps" ] || die "set CAREFL_EPSILON_CAP: this hospital's privacy budget, the epsilon it allows over ALL runs (e.g. 8.0)"
        [ -n "$delta" ] || die "set CAREFL_DELTA: the delta of that budget (e.g. 1e-5)"
    fi
    node_config="hospital=\"$hospital\" state-dir=\"${CAREFL_STATE_DIR:-/state}\""
    if [ -n "$data" ]; then
        is_plain "$data" || die "CAREFL_DATA_PATH must not contain quotes or backslashes"
        node_config+=" data-path=\"$data\""
    fi
    if [ -n "$eps" ]; then
        is_number "$eps" || die "CAREFL_EPSILON_CAP=$eps is not a number"
        node_config+=" epsilon-cap=$eps"
    fi
    if [ -n "$delta" ]; then
        is_number "$delta" || die "CAREFL_DELTA=$delta is not a number"
        node_config+=" delta=$delta"
    fi
    if [ -n "$require_dp" ]; then
        [[ "$require_dp" =~ ^(true|false)$ ]] || die "CAREFL_REQUIRE_DP must be true or false"
        node_config+=" require-dp=$require_dp"
    fi
    if [ -n "$policy" ]; then
        is_plain "$policy" || die "CAREFL_SITE_POLICY must not contain quotes or backslashes"
        node_config+=" site-policy=\"$policy\""
    fi
    [ -n "${CAREFL_NODE_CONFIG:-}" ] && node_config+=" $CAREFL_NODE_CONFIG"
    # The SuperNode <-> ClientApp Runtime API stays on loopback inside this container; it
    # still uses TLS, with a throw-away CA made now that never leaves the container.
    runtime_tls=/tmp/carefl-runtime
    rm -rf "$runtime_tls"
    python "$tools/gen_certs.py" --ephemeral-runtime "$runtime_tls" >/dev/null
    export FLWR_HOME="${FLWR_HOME:-/tmp/flwr}"
    set -x
    exec flower-supernode \
        --superlink "${CAREFL_SUPERLINK:-fleet-gateway:8000}" \
        --root-certificates "$CA_CERT" \
        --auth-supernode-private-key "$node_key" \
        --trusted-entities "$trusted" \
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
flwr)
    mark_role flwr
    exec python "$tools/launch.py" flwr "$@"
    ;;
init)
    mark_role init
    [ "$(id -u)" = 0 ] || die "init must run as root (it fixes file ownership); compose sets user: \"0:0\""
    certs=/certs keys=/keys
    python "$tools/gen_certs.py" --certs "$certs" --keys "$keys" \
        --superlink-names "${CAREFL_SUPERLINK_NAMES:-superlink,localhost,127.0.0.1}" \
        --gateway-names "${CAREFL_GATEWAY_NAMES:-fleet-gateway,localhost,127.0.0.1}" \
        --hospitals "${CAREFL_HOSPITALS:-st-mary,riverside,northfield}" "$@"
    # Public keys in one place for `register`; private keys readable only by their user:
    # the app user, except the ServerApp runtime's copy of the SuperExec secret (it runs as
    # CAREFL_UID:CAREFL_GID so that result files belong to you).
    mkdir -p "$certs/supernodes"
    for pub in "$keys"/*/supernode.pub; do
        [ -e "$pub" ] || continue
        name="$(basename "$(dirname "$pub")")"
        cp "$pub" "$certs/supernodes/$name.pub"
    done
    chmod -R a+rX "$certs"
    for dir in "$keys"/*/; do
        name="$(basename "$dir")"
        [ "$name" = ca ] && continue   # the CA key is for the operator only
        owner="$APP_UID:$APP_GID"
        [ "$name" = serverapp ] && owner="${CAREFL_UID:-$APP_UID}:${CAREFL_GID:-$APP_GID}"
        chown -R "$owner" "$dir"; chmod 0700 "$dir"; chmod 0600 "$dir"*
    done
    # Each hospital's privacy state (its epsilon spent over all runs) lives in a host
    # folder, never in a Docker volume: `docker compose down -v` must not reset a budget.
    if [ -d /state-root ]; then
        IFS=, read -r -a hospitals <<< "${CAREFL_HOSPITALS:-st-mary,riverside,northfield}"
        for h in "${hospitals[@]}"; do
            h="${h// /}"
            [ -n "$h" ] || continue
            mkdir -p "/state-root/$h"
            chown -R "$APP_UID:$APP_GID" "/state-root/$h"; chmod 0700 "/state-root/$h"
        done
    fi
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
    echo "init: certificates in /certs, keys in /keys, state folders and outputs ready"
    ;;
gen-certs)
    exec python "$tools/gen_certs.py" "$@"
    ;;
"")
    die "no role given (superlink | fleet-gateway | app-registry | serverapp | supernode | register | launch | flwr | init | gen-certs)"
    ;;
*)
    exec "$role" "$@"
    ;;
esac
