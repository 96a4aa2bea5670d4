-- Run once by the postgres image on an empty data directory (as POSTGRES_USER): the users database of
-- MLflow's basic-auth app, next to the `mlflow` database (POSTGRES_DB) that holds the runs.
CREATE DATABASE mlflow_auth;
