"""Held-out splits of real QA data for training experiments.

SQuAD-open by article: every paragraph of SQuAD v1.1 dev is in the corpus, the questions of
`num_eval_articles` articles (drawn by `seed`) are held out for evaluation and those of the others
train. Nothing about a held-out article is seen in training except its paragraphs in the index,
as in the synthetic-biographies split (`ragjax.data.synthetic`).
"""
from __future__ import annotations

import numpy as np

from ragjax.data import corpus, qa
from ragjax.errors import DataError


def squad_article_split(path, num_eval_articles: int = 10, seed: int = 0
                        ) -> tuple[list[corpus.Passage], list[qa.Question], list[qa.Question]]:
  """`(passages, train questions, eval questions)` of a SQuAD v1.1 JSON file.

  An article's questions go to eval when its index is among the `num_eval_articles` drawn by
  `np.random.default_rng(seed).permutation(num_articles)[:num_eval_articles]`; a question's
  article is read from its gold paragraph id (`corpus.squad_paragraph_id`).

  Raises: DataError for a file that is not SQuAD, or `num_eval_articles` not in [1, articles).
  """
  passages = corpus.read_passages(path, "squad")
  questions = qa.read_questions(path, "squad")
  articles = sorted({p.id.rsplit("-", 2)[1] for p in passages})
  if not 1 <= num_eval_articles < len(articles):
    raise DataError(f"num_eval_articles={num_eval_articles}: expected 1..{len(articles) - 1}",
                    path=path, field="data.num_eval_articles")
  held = {articles[i] for i in
          np.random.default_rng(seed).permutation(len(articles))[:num_eval_articles]}
  article_of = lambda q: q.gold_passage_ids[0].rsplit("-", 2)[1]
  train = [q for q in questions if article_of(q) not in held]
  evals = [q for q in questions if article_of(q) in held]
  return passages, train, evals
