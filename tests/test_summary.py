"""Parameter counts of the full model from shapes alone."""

from configs import mimo_v2_flash
from mimo_jax.config import model_config_from_dict
from mimo_jax.model import param_count


def test_full_model_counts_match_the_report():
    rows = param_count.count_parameters(
        model_config_from_dict(mimo_v2_flash.get_config().model))
    main = [r for r in rows if not r.component.startswith("MTP")]
    total = sum(r.total for r in main)
    active = sum(r.active for r in main)
    assert abs(total / 309e9 - 1) < 0.01, total
    assert abs(active / 15e9 - 1) < 0.04, active
    mtp = [r.total for r in rows if r.component.startswith("MTP")]
    assert len(mtp) == 1 and abs(mtp[0] / 0.33e9 - 1) < 0.01
    table = param_count.format_table(rows)
    assert "308.78B" in table and "MTP head 0" in table
