-- Runs once, when the postgres service first starts on an empty volume (the image's
-- /docker-entrypoint-initdb.d). POSTGRES_DB already created `mlflow` (the tracking store), owned by
-- POSTGRES_USER; these are the other two, with the same owner.
CREATE DATABASE mlflow_auth;  -- MLflow basic-auth users and permissions
CREATE DATABASE prefect;      -- the Prefect server
