"""The [workflow] config table: defaults match the service's, bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rooms.chat import RetentionKind
from rooms.service import WorkflowConfig
from signalling.config import ConfigError, load_config
from signalling.workflow import workflow_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_services_and_the_sample_config_loads() -> None:
    assert workflow_config(load_config(env={}).workflow) == WorkflowConfig()
    assert load_config(REPO / "deploy" / "openconsult.sample.toml", env={}).workflow == load_config(env={}).workflow


def test_file_and_environment_values_reach_the_service(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[workflow]\nchat_max_bytes = 100\nchat_retention = "delete_after_days"\nchat_retention_days = 30\n')
    config = workflow_config(load_config(path, env={"OPENCONSULT_WORKFLOW__LINK_VALID_BEFORE_MIN": "15"}).workflow)
    assert (config.chat_max_bytes, config.retention.kind, config.retention.days) == \
        (100, RetentionKind.DELETE_AFTER_DAYS, 30)
    assert config.link_valid_before_ms == 15 * 60_000


@pytest.mark.parametrize(("table", "message"), [
    ("colour = 1", 'unknown config key "workflow.colour"'),
    ("chat_max_bytes = 0", "workflow.chat_max_bytes must be 1-65536"),
    ('chat_retention = "forever"', "workflow.chat_retention must be one of"),
    ('chat_retention = "delete_after_days"', "workflow.chat_retention_days must be >= 1"),
    ("link_valid_before_min = -1", "workflow.link_valid_before_min must be 0-10080"),
    ("strict_departments = 3", "workflow.strict_departments must be true or false"),
    ('public_url = "ftp://x"', "workflow.public_url must start with http"),
    ("retention_sweep_s = 0", "workflow.retention_sweep_s must be 0.1-604800 seconds"),
    ('retention_sweep_s = "often"', "workflow.retention_sweep_s must be a number"),
    ("walk_in_link_valid_min = 0", "workflow.walk_in_link_valid_min must be 1-43200 minutes"),
    ("walk_in_per_link_per_min = 0", "workflow.walk_in_per_link_per_min must be 1-10000"),
    ('walk_in_per_link_per_min = "lots"', "workflow.walk_in_per_link_per_min must be an integer"),
])
def test_bad_values_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[workflow]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})
