"""Where the fine-tuning state lives (beside the registry) and its schema: its own tables and
version in the registry's database (PostgreSQL) or in `training.sqlite`, migrated on open,
refused when newer than this code, on both databases."""

from pathlib import Path

import pytest

from loraplex.adapters.registry import SCHEMA_VERSION, Registry
from loraplex.adapters.registry_sql import RegistrySchemaError
from loraplex.training.database import MIGRATIONS, open_training_db, training_location


def test_the_training_state_lives_beside_the_registry(tmp_path):
    url = "postgresql://u@db.internal/loraplex"
    assert training_location(tmp_path, None) == tmp_path / "training.sqlite"
    assert training_location(tmp_path, url) == url
    assert training_location(tmp_path, "/srv/shared/registry.sqlite") == Path("/srv/shared/training.sqlite")


def test_own_schema_and_version_beside_the_registrys(registry_location, tmp_path):
    with Registry(registry_location) as registry:
        db = open_training_db(tmp_path / "data", registry_location)
        try:
            assert db.schema_version == len(MIGRATIONS) and registry.schema_version == SCHEMA_VERSION
            with db.read() as conn:
                assert conn.execute("SELECT count(*) FROM training_jobs").fetchone()[0] == 0
            with db.write() as conn:  # a newer training schema, written behind this code's back
                db.backend.write_version(conn, len(MIGRATIONS) + 1)
        finally:
            db.close()
        with pytest.raises(RegistrySchemaError, match="training schema version .* is newer"):
            open_training_db(tmp_path / "data", registry_location)
        assert registry.schema_version == SCHEMA_VERSION  # the registry's own version is untouched
        registry.create_account("still usable")
