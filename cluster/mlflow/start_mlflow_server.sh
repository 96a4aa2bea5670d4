#!/usr/bin/env bash
# The team's MLflow tracking server for medtune, on a bare host: PostgreSQL for runs and users, artifacts
# proxied by the server (clients need no bucket credentials), basic authentication always on, bound to a
# private address only. The systemd unit (mlflow-server.service) and the compose file run this same script.
#
#   pip install 'mlflow[auth]==3.17.*' 'psycopg[binary]' boto3    # boto3 for s3://, google-cloud-storage for gs://
#   set -a; . /etc/medtune/mlflow.env; set +a                # see mlflow.env.example: every variable below
#   cluster/mlflow/start_mlflow_server.sh
#
# Clients (the tune.py driver only) use --tracking-uri http://MLFLOW_HOST:MLFLOW_PORT with MLFLOW_TRACKING_USERNAME /
# MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials. Create their users as admin, e.g.
#   python -c "from mlflow.server.auth.client import AuthServiceClient as A; A('http://10.0.0.10:5000').create_user('medtune', '...')"
# with MLFLOW_TRACKING_USERNAME=admin and MLFLOW_TRACKING_PASSWORD set. Serve it over TLS (a reverse proxy
# on the same private network) when the network between clients and server is not trusted.
#
# Exit 2 with one line on a missing or unsafe setting, before anything starts.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() { echo "error: $*" >&2; exit 2; }

[ -n "${MLFLOW_HOST:-}" ] || fail "set MLFLOW_HOST to this machine's private address (e.g. 10.0.0.10)"
MLFLOW_PORT=${MLFLOW_PORT:-5000}
[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ] ||
  fail "set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/mlflow-artifacts, gs://..., or a local directory)"
[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] ||
  fail "set MLFLOW_FLASK_SERVER_SECRET_KEY to a long random string (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
export MLFLOW_AUTH_CONFIG_PATH=${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}
[ -r "$MLFLOW_AUTH_CONFIG_PATH" ] || fail "cannot read the auth config $MLFLOW_AUTH_CONFIG_PATH"
# PostgreSQL through libpq's environment (PGHOST, PGUSER, PGPASSWORD or ~/.pgpass): no password on the
# command line, where `ps` would show it.
MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg:///${MLFLOW_DATABASE:-mlflow}}
if [[ $MLFLOW_BACKEND_STORE_URI == postgresql* ]]; then
  [ -n "${PGHOST:-}" ] || fail "set PGHOST (and PGUSER, PGPASSWORD or ~/.pgpass) for the PostgreSQL server"
  [[ $MLFLOW_BACKEND_STORE_URI != *://*:*@* ]] ||  # user:password@ (a user alone is fine)
    fail "keep the password out of MLFLOW_BACKEND_STORE_URI; use PGPASSWORD"
fi

# Private addresses only. 0.0.0.0 only inside a container whose port is published on a private address.
python3 - "$MLFLOW_HOST" "${MEDTUNE_MLFLOW_IN_CONTAINER:-0}" <<'PY' || exit 2
import ipaddress, sys

host, in_container = sys.argv[1], sys.argv[2] == "1"
try:
    address = ipaddress.ip_address(host)
except ValueError:
    sys.exit(f"error: MLFLOW_HOST={host} is not an IP address; give the private address to bind to")
if address.is_unspecified and not in_container:
    sys.exit(f"error: MLFLOW_HOST={host} would listen on every interface; give the private address to bind to")
if not (address.is_private or address.is_loopback or (address.is_unspecified and in_container)):
    sys.exit(f"error: MLFLOW_HOST={host} is a public address; bind MLflow to a private one (10.x, 172.16-31.x, 192.168.x)")
PY

allowed_hosts=${MLFLOW_ALLOWED_HOSTS:-$MLFLOW_HOST:$MLFLOW_PORT,$MLFLOW_HOST,localhost:$MLFLOW_PORT,127.0.0.1:$MLFLOW_PORT}

exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "$MLFLOW_HOST" \
  --port "$MLFLOW_PORT" \
  --workers "${MLFLOW_WORKERS:-4}" \
  --allowed-hosts "$allowed_hosts"
