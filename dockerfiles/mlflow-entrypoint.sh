#!/bin/sh
# Entrypoint of mlflow.Dockerfile: writes MLflow's basic-auth config from the environment, then runs the
# command (`mlflow server ... --app-name basic-auth`).
#
# MLflow reads the auth database URI only from the ini file at MLFLOW_AUTH_CONFIG_PATH, never from the
# environment, and that URI holds the database password: so the file is written here, at container start,
# readable by this user only, and never baked into the image. The admin password stays in the environment
# (MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD itself, and only to create the admin on the first start).
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?must be set, e.g. postgresql://rlhf:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?must be set, e.g. postgresql://rlhf:PASSWORD@postgres:5432/mlflow_auth}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?must be set: a long random string, the same on every MLflow replica}"

config="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$config")"
# configparser reads % as interpolation: a URL-encoded password (%40) is written as %%40
database_uri=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${database_uri}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
exec "$@"
