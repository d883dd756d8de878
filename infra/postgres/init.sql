-- Run once by the postgres image on an empty volume: the two databases of the team topology,
-- owned by the role the image creates from POSTGRES_USER (rosa2).
CREATE DATABASE mlflow OWNER rosa2;
CREATE DATABASE prefect OWNER rosa2;
