import pytest
from jax.sharding import PartitionSpec as P

from nanochat_jax.model.sharding import logical_to_spec, make_mesh, parse_mesh_spec


def test_mesh_specs():
    assert parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1}
    assert parse_mesh_spec("fsdp:8", 8) == {"data": 1, "fsdp": 8}
    assert parse_mesh_spec("data:2, fsdp:4", 8) == {"data": 2, "fsdp": 4}
    mesh = make_mesh("data:2,fsdp:4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    for bad, match in [("data:3", "has 3 devices"), ("model:8", "bad --mesh entry"), ("data8", "bad --mesh entry"),
                       ("data:0,fsdp:8", "bad --mesh entry"), ("data:2,data:4", "given twice")]:
        with pytest.raises(ValueError, match=match):
            parse_mesh_spec(bad, 8)


def test_logical_rules():
    mesh = make_mesh("data:2,fsdp:4")
    assert logical_to_spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", None)
    assert logical_to_spec(("vocab", "embed"), (128, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("embed", "kv_heads"), (6, 8), mesh) == P(None, None)  # 4 does not divide 6
    assert logical_to_spec(("embed", "mlp"), (64, 256), make_mesh("data:8")) == P(None, None)  # data: replicated


def test_optimizer_state_rules_split_over_every_device():
    from nanochat_jax.model.sharding import OPT_STATE_RULES
    mesh = make_mesh("data:8")
    assert logical_to_spec(("embed", "mlp"), (64, 256), mesh, OPT_STATE_RULES) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), (12, 256), mesh, OPT_STATE_RULES) == P(None, None)
