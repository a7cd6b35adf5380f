"""CGL metric (SLGR_BEHAVIOUR.md §5.1): chance level, averaging, contrastive entropy, seeded negatives."""

import math

import numpy as np
import pytest

from genret_jax.errors import InputError
from genret_jax.scaling import cgl


def test_chance_level_all_losses_equal():
  rng = np.random.default_rng(0)
  levels = rng.uniform(0.5, 3.0, size=7)
  neg = np.repeat(levels[:, None], 256, axis=1)
  res = cgl.cgl_from_losses([[v] for v in levels], neg)
  assert res.mean == pytest.approx(math.log(257 / 256), abs=1e-12)
  assert res.mean == pytest.approx(0.0038986, abs=5e-8)
  assert cgl.chance_cgl() == pytest.approx(0.0038986, abs=5e-8)
  np.testing.assert_allclose(res.contrastive_entropy, math.log(257), rtol=1e-12)
  np.testing.assert_allclose(res.ratio, 1.0)


def test_cgl_formula_by_hand():
  neg = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
  res = cgl.cgl_from_losses([[0.5, 0.9], [4.0]], neg)  # l+ = min over positives.
  np.testing.assert_allclose(res.ell_pos, [0.5, 4.0])
  np.testing.assert_allclose(res.s_neg, [6.0, 6.0])
  np.testing.assert_allclose(res.cgl, [math.log(1 + 0.5 / 6), math.log(1 + 4 / 6)])
  ce0 = -math.log(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1) + math.exp(-2) + math.exp(-3)))
  assert res.contrastive_entropy[0] == pytest.approx(ce0, rel=1e-12)
  np.testing.assert_allclose(res.ratio, [0.5 / 2.0, 4.0 / 2.0])
  # CE stays finite for large losses (log-sum-exp).
  big = cgl.cgl_from_losses([[800.0]], np.full((1, 4), 900.0))
  assert big.contrastive_entropy[0] == pytest.approx(-math.log(1 / (1 + 4 * math.exp(-100))), abs=1e-12)
  # A better model (lower positive loss) has lower CGL and CE.
  worse = cgl.cgl_from_losses([[1.0], [4.0]], neg)
  assert res.cgl[0] < worse.cgl[0] and res.contrastive_entropy[0] < worse.contrastive_entropy[0]


def test_document_loss_averaging():
  nll = np.array([[2.0, 9.0, 0.0]])  # third identifier absent (0 tokens).
  tok = np.array([[2, 3, 0]])
  assert cgl.document_loss(nll, tok, "token")[0] == pytest.approx(11.0 / 5.0)
  assert cgl.document_loss(nll, tok, "identifier")[0] == pytest.approx((1.0 + 3.0) / 2.0)
  with pytest.raises(InputError, match="averaging"):
    cgl.document_loss(nll, tok, "mean")
  with pytest.raises(InputError, match="no scored identifier"):
    cgl.document_loss(np.zeros((1, 2)), np.zeros((1, 2)))


def test_cgl_from_identifier_nll_matches_losses():
  rng = np.random.default_rng(1)
  q, n, ids = 3, 8, 4
  neg_tok = rng.integers(1, 6, size=(q, n, ids))
  neg_nll = rng.uniform(0.5, 2.0, size=(q, n, ids)) * neg_tok
  pos_tok = [rng.integers(1, 6, size=(k, ids)) for k in (1, 2, 3)]
  pos_nll = [rng.uniform(0.1, 1.0, size=t.shape) * t for t in pos_tok]
  res = cgl.cgl_from_identifier_nll(pos_nll, pos_tok, neg_nll, neg_tok)
  neg_l = neg_nll.sum(-1) / neg_tok.sum(-1)
  pos_l = [(a.sum(-1) / t.sum(-1)) for a, t in zip(pos_nll, pos_tok)]
  ref = cgl.cgl_from_losses(pos_l, neg_l)
  np.testing.assert_allclose(res.cgl, ref.cgl)
  assert res.num_negatives == n and cgl.chance_cgl(n) == pytest.approx(math.log(9 / 8))


def test_bad_losses_raise():
  with pytest.raises(InputError, match="no positive"):
    cgl.cgl_from_losses([[]], np.ones((1, 3)))
  with pytest.raises(InputError, match="queries"):
    cgl.cgl_from_losses([[1.0]], np.ones((2, 3)))
  with pytest.raises(InputError, match="non-finite"):
    cgl.cgl_from_losses([[np.inf]], np.ones((1, 3)))


def test_negatives_seeded_exclude_positives_and_roundtrip(tmp_path):
  positives = {0: [0, 5, 7], 1: [3], 2: [], 3: list(range(10, 300))}
  a = cgl.sample_negatives(1000, positives, n=256, seed=3, num_queries=4, query_ids=["a", "b", "c", "d"])
  b = cgl.sample_negatives(1000, positives, n=256, seed=3, num_queries=4)
  c = cgl.sample_negatives(1000, positives, n=256, seed=4, num_queries=4)
  assert a.negatives.shape == (4, 256)
  np.testing.assert_array_equal(a.negatives, b.negatives)
  assert a.fingerprint() == b.fingerprint() != c.fingerprint()
  for i, pos in positives.items():
    row = a.negatives[i]
    assert len(set(row.tolist())) == 256  # without replacement
    assert not set(row.tolist()) & set(pos)
    assert row.min() >= 0 and row.max() < 1000
  # Per-query seeding: a query's negatives do not depend on the other queries.
  only_first = cgl.sample_negatives(1000, [[0, 5, 7]], n=256, seed=3)
  np.testing.assert_array_equal(only_first.negatives[0], a.negatives[0])
  for suffix in (".json", ".npz"):
    path = tmp_path / f"neg{suffix}"
    a.save(path)
    back = cgl.NegativeSet.load(path)
    np.testing.assert_array_equal(back.negatives, a.negatives)
    assert (back.seed, back.num_docs, back.query_ids) == (3, 1000, ("a", "b", "c", "d"))


def test_negatives_uniform_and_small_corpus():
  # Over many queries every non-positive document is drawn about equally often.
  neg = cgl.sample_negatives(20, [[4]] * 4000, n=5, seed=0).negatives
  counts = np.bincount(neg.ravel(), minlength=20)
  assert counts[4] == 0
  others = np.delete(counts, 4)
  assert others.min() > 0.85 * others.mean() and others.max() < 1.15 * others.mean()
  with pytest.raises(InputError, match="num_negatives"):
    cgl.sample_negatives(100, [[1, 2]], n=256, seed=0)
  few = cgl.sample_negatives(100, [[1, 2], [3]], n=256, seed=0, allow_fewer=True)
  assert few.num_negatives == 98


def test_summary_bootstrap_ci():
  rng = np.random.default_rng(0)
  neg = rng.uniform(1.0, 3.0, size=(300, 256))
  pos = [[v] for v in rng.uniform(0.5, 2.0, size=300)]
  res = cgl.cgl_from_losses(pos, neg)
  s1 = res.summary(num_resamples=200, seed=0)
  s2 = res.summary(num_resamples=200, seed=0)
  assert s1 == s2
  assert s1["cgl_ci"][0] < s1["cgl"] < s1["cgl_ci"][1]
  assert s1["ce_ci"][0] < s1["ce"] < s1["ce_ci"][1]
  pq = res.per_query([str(i) for i in range(300)])
  assert len(pq["cgl"]) == 300 and pq["num_negatives"] == 256
