-- The publication ledger's database, beside Prefect's (compose.yml, WIS2_LEDGER_URL). Run by the
-- postgres image on the first start of an empty data volume, as POSTGRES_USER (its owner).
CREATE DATABASE ledger;
