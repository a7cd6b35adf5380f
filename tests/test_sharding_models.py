"""Sharding proof on 8 simulated devices: (data=2, fsdp=2, model=2) == single device, params really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from genret_jax.errors import InputError
from genret_jax.models import partitioning
from genret_jax.models.llama import LlamaConfig
from genret_jax.models.model_api import DecoderOnlyModel, EncoderDecoderModel
from genret_jax.models.t5 import T5Config

V = 64
MODELS = {
    "t5": lambda: EncoderDecoderModel(T5Config(vocab_size=V, d_model=32, num_heads=4, head_dim=8, d_ff=32,
                                               num_encoder_layers=1, num_decoder_layers=1, dtype="float32")),
    "llama": lambda: DecoderOnlyModel(LlamaConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4,
                                                  num_kv_heads=2, d_ff=32, dtype="float32")),
}


def _batch(family):
  rng = np.random.RandomState(0)
  tgt = rng.randint(2, V, (4, 6)).astype(np.int32)
  tgt[:, -1] = 0
  batch = {"decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32),
           "decoder_input_tokens": np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1)}
  if family == "t5":
    batch["encoder_input_tokens"] = rng.randint(2, V, (4, 8)).astype(np.int32)
  return batch


def test_make_mesh_fills_minus_one_and_validates():
  mesh = partitioning.make_mesh(data=-1, fsdp=2, model=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  with pytest.raises(InputError):
    partitioning.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(InputError):
    partitioning.make_mesh(data=16, fsdp=1, model=1)  # more devices than exist


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_sharded_forward_and_grads_equal_single_device(family):
  model = MODELS[family]()
  rng = np.random.RandomState(0)  # numpy init: no XLA compile of random ops on CPU
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype),
                        jax.eval_shape(model.init, jax.random.key(0)))
  batch = _batch(family)

  def loss(p, b):
    return model.loss_fn(p, b, None)[0]

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, batch)
  ref_logits = jax.jit(lambda p, b: model._logits(p, b, None))(params, batch)

  mesh = partitioning.make_mesh(data=2, fsdp=2, model=2)
  shardings = model.param_shardings(mesh)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    sbatch = jax.device_put(batch, partitioning.batch_sharding(mesh))
    step = jax.jit(jax.value_and_grad(loss), out_shardings=(NamedSharding(mesh, P()), shardings))
    s_loss, s_grads = step(sharded, sbatch)
    s_logits = jax.jit(lambda p, b: model._logits(p, b, None))(sharded, sbatch)

  np.testing.assert_allclose(s_loss, ref_loss, atol=1e-5)
  np.testing.assert_allclose(s_logits, ref_logits, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s_grads, ref_grads)
  # logits come out batch-sharded over (data, fsdp), vocab over model
  assert s_logits.sharding.spec == P(("data", "fsdp"), None, "model")

  # the parameters really are sharded the way the rules say
  emb = sharded["token_embedder"]["embedding"]
  assert emb.sharding.spec == P("model", "fsdp")
  assert {s.data.shape for s in emb.addressable_shards} == {(V // 2, 16)}
  block = sharded["decoder"]["layers_0"] if family == "t5" else sharded["layers_0"]
  mlp_in = block["mlp"]["wi_0"]["kernel"]
  assert mlp_in.sharding.spec == P("fsdp", "model")
  assert {s.data.shape for s in mlp_in.addressable_shards} == {(16, 16)}
  attn = block["self_attention"] if family == "t5" else block["attention"]
  assert attn["query"]["kernel"].sharding.spec == P("fsdp", "model", None)
  assert attn["out"]["kernel"].sharding.spec == P("model", None, "fsdp")
  assert attn["key"]["kernel"].sharding.spec == P("fsdp", "model", None)
  for leaf in jax.tree.leaves(s_grads):  # grads follow the param shardings
    assert isinstance(leaf.sharding, NamedSharding)


def test_indivisible_dims_fall_back_to_replicated():
  model = DecoderOnlyModel(LlamaConfig(vocab_size=63, d_model=24, num_layers=1, num_heads=3, num_kv_heads=1,
                                       d_ff=30, dtype="float32"))
  mesh = partitioning.make_mesh(data=2, fsdp=2, model=2)
  specs = partitioning.param_partition_specs(model.abstract_params(), mesh)
  assert specs["token_embedder"]["embedding"] == P(None, "fsdp")  # 63 rows do not split in 2
  assert specs["layers_0"]["attention"]["key"]["kernel"] == P("fsdp", None, None)  # 1 KV head
  assert specs["layers_0"]["mlp"]["wi_0"]["kernel"] == P("fsdp", "model")
