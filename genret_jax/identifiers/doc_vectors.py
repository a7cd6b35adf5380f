"""Dense document vectors for the learned docid schemes: TF-IDF + TruncatedSVD (scikit-learn), seeded."""

from __future__ import annotations

import numpy as np
import threadpoolctl

from genret_jax.corpora.types import Collection
from genret_jax.identifiers.base import document_text


def tfidf_svd_vectors(collection: Collection, dim: int, seed: int, max_features: int = 20000) -> np.ndarray:
  """[num_docs, <=dim] float64 L2-normalised vectors. Empty documents get the zero vector."""
  # One BLAS thread: faster on shared small machines, and floating-point sums stay in one order. The limit only
  # reaches libraries already loaded, so scikit-learn (and the BLAS it brings) is imported first: imported inside,
  # a process's first call ran multi-threaded and gave different vectors (and docids) from the later calls.
  import sklearn.decomposition  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  with threadpoolctl.threadpool_limits(1):
    return _vectors([document_text(d) for d in collection.documents], dim, seed, max_features)


def _vectors(texts: list[str], dim: int, seed: int, max_features: int) -> np.ndarray:
  # Imported here, not at the top: see learned_schemes._kmeans.
  from sklearn.decomposition import TruncatedSVD  # pylint: disable=g-import-not-at-top
  from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=g-import-not-at-top
  # min_df=2: words seen once cannot make two documents similar and only slow the SVD down.
  min_df = 2 if len(texts) >= 50 else 1
  vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=min_df,
                               max_features=max_features, dtype=np.float64)
  try:
    tfidf = vectorizer.fit_transform(texts)
  except ValueError as e:
    # Every document empty or stop words only: no vocabulary at all. Any other ValueError (a bad parameter: the
    # options are checked by the schemes' make_config) was once taken for this and gave sequential ids.
    if "empty vocabulary" not in str(e) and "no terms remain" not in str(e):
      raise
    return np.zeros((len(texts), 1))
  k = max(1, min(dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1))
  if tfidf.shape[1] <= 1 or tfidf.shape[0] <= 1:
    vectors = tfidf.toarray()
  else:
    vectors = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=4,
                           random_state=seed).fit_transform(tfidf)
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
