import copy

import pytest
import yaml

from sopq.config import ConfigError, validate_config


@pytest.fixture
def config():
    with open("config.yaml") as f:
        return yaml.safe_load(f)


def test_default_config_is_valid(config):
    validate_config(config)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(budget=6), r"\(top level\): Additional properties are not allowed \('budget' was unexpected\)"),
        (lambda c: c.update(budget_bpw="six"), r"budget_bpw: 'six' is not of type 'number'"),
        (lambda c: c["quantization"].update(group=48), r"quantization.group: 48 is not valid"),
        (lambda c: c["quantization"].update(allowed_bits=[3, 6]), r"quantization.allowed_bits.0: 3 is not one of"),
        (lambda c: c["families"]["bert"].update(kind="decoder"), r"families.bert.kind: 'decoder' is not one of"),
        (lambda c: c["families"]["bert"].pop("source"), r"families.bert: 'source' is a required property"),
        (lambda c: c["layers"].update(exclude=["(unclosed"]), r"layers.exclude: bad regular expression"),
        (lambda c: c.update(tie_groups=[["q_proj", "[k"]]), r"tie_groups.0: bad regular expression '\[k'"),
        (lambda c: c["families"]["llama"].pop("source_precision"), r"'source_precision' is a required property"),
        (lambda c: c.pop("calibration"), r"'calibration' is a required property"),
        # one case per remaining kind of schema rule: bounds, non-empty, unique, names, patterns
        (lambda c: c["importance"].update(rel_error=0), r"importance.rel_error: 0 is less than or equal to the minimum of 0"),
        (lambda c: c["importance"].update(rel_error=2), r"importance.rel_error: 2 is greater than the maximum of 1"),
        (lambda c: c["calibration"].update(seq_len=1), r"calibration.seq_len: 1 is less than the minimum of 2"),
        (lambda c: c["layers"].update(include=[]), r"layers.include: \[\] should be non-empty"),
        (lambda c: c["quantization"].update(allowed_bits=[6, 6]), r"quantization.allowed_bits: \[6, 6\] has non-unique elements"),
        (lambda c: c.update(families={}), r"families: \{\} should be non-empty"),
        (lambda c: c["families"].update({"my model": c["families"]["bert"]}), r"families: 'my model' does not match"),
        (lambda c: c["text"].update(sha256="XYZ"), r"text.sha256: 'XYZ' does not match '\^\[0-9a-f\]\{64\}\$'"),
        (lambda c: c.update(tie_groups=[["q_proj"]]), r"tie_groups.0: \['q_proj'\] is too short"),
        (lambda c: c["quantization"].update(error_feedback="yes"), r"quantization.error_feedback: 'yes' is not of type 'boolean'"),
    ],
)
def test_bad_config_is_one_clear_line(config, change, message):
    bad = copy.deepcopy(config)
    change(bad)
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(bad)
    assert "\n" not in str(error.value)
