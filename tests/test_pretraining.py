"""Joint pretraining on unlabelled text: the salient-span tagger, the three tasks' examples, the
own-passage/document exclusion inside retrieval (never leaks, against brute force), and the
config and data errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragjax import config as config_lib
from ragjax.data.corpus import Passage
from ragjax.errors import ConfigError, DataError
from ragjax.objectives.pretraining import pretraining_examples, salient_spans
from ragjax.retrieval.topk import exclude_rows
from ragjax.system import feed

TEXT = ("Ximena Costa was born on 12 March 1987 in Lyon. She studied physics at the University "
        "of Tokyo and earned 3,370 dollars in 2004. In May 1990 she scored 4.5 of 17.")


def test_salient_span_tagger_finds_dates_numbers_and_names():
  got = [(TEXT[a:b], kind) for a, b, kind in salient_spans(TEXT)]
  assert got == [("Ximena Costa", "name"), ("12 March 1987", "date"), ("Lyon", "name"),
                 ("University of Tokyo", "name"), ("3,370", "number"), ("2004", "date"),
                 ("May 1990", "date"), ("4.5", "number"), ("17", "number")]
  # "She" and "In" start sentences; lower-case text has no span.
  assert salient_spans("the river runs to the sea") == []


def _corpus():
  return [Passage("d1-0", "Ximena Costa", TEXT), Passage("d1-1", "Ximena Costa",
                                                        "Her brother Tomas Costa lives in Oslo."),
          Passage("d2-0", "River", "the river runs to the sea and never stops")]


def test_salient_span_examples_mask_one_span_and_exclude_their_passage_or_document():
  ex = pretraining_examples(_corpus(), "salient_span", seed=3)
  assert [q.exclude_passage_ids for q in ex] == [("d1-0",), ("d1-1",)]  # d2-0 has no span
  for q, p in zip(ex, _corpus()):
    assert q.question.count("[MASK]") == 1
    assert q.question.replace("[MASK]", q.answers[0]) == p.text
    assert q.answers[0] in [p.text[a:b] for a, b, _ in salient_spans(p.text)]
  doc = pretraining_examples(_corpus(), "salient_span", seed=3, exclude="document")
  assert [q.exclude_passage_ids for q in doc] == [("d1-0", "d1-1")] * 2
  assert [q.answers for q in doc] == [q.answers for q in ex]         # same seed, same spans


def test_span_corruption_and_prefix_lm_examples_reconstruct_the_passage():
  words = " ".join(f"w{i}" for i in range(200))
  [q] = pretraining_examples([Passage("a", "", words)], "span_corruption", seed=1)
  sentinels = [w for w in q.question.split() if w.startswith("<extra_id_")]
  assert len(sentinels) == 10                        # round(round(200 * 0.15) / 3) spans
  spans, cur = {}, None
  for w in q.answers[0].split():
    if w.startswith("<extra_id_"):
      cur = w
      spans[cur] = []
    else:
      spans[cur].append(w)
  assert sum(len(v) for v in spans.values()) == 30   # round(200 * 0.15) noise words
  rebuilt = " ".join(" ".join(spans[w]) if w in spans else w for w in q.question.split())
  assert rebuilt == words
  [p] = pretraining_examples([Passage("a", "", words)], "prefix_lm", max_target_words=5)
  assert words.startswith(p.question + " " + p.answers[0]) and len(p.answers[0].split()) == 5


def test_a_corpus_without_salient_spans_is_refused_naming_it():
  with pytest.raises(DataError, match=r"corpus\.jsonl: field 'data\.pretrain\.objective': "
                                      r"salient_span: no salient span"):
    pretraining_examples([Passage("x", "", "the river runs")], "salient_span",
                         where="corpus.jsonl")
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  cfg.data.pretrain.objective = "salient_spans"
  with pytest.raises(ConfigError, match="data.pretrain.objective 'salient_spans'"):
    config_lib.validate(cfg, data=True)


def _reference_exclude(rows, exclude, k):
  return np.array([[r for r in row if r not in set(ex[ex >= 0])][:k]
                   for row, ex in zip(rows, exclude)])


def test_exclude_rows_equals_a_python_filter_and_never_leaks():
  rng = np.random.RandomState(0)
  for _ in range(20):
    b, e, k, n = 6, rng.randint(1, 5), rng.randint(1, 6), 40
    m = k + e
    rows = np.stack([rng.permutation(n)[:m] for _ in range(b)])
    exclude = np.where(rng.rand(b, e) < 0.7, rows[:, rng.randint(0, m, e)], -1)  # often hit
    want = _reference_exclude(rows, exclude, k)
    for xp in (np, jnp):
      pos = np.asarray(exclude_rows(xp.asarray(rows), xp.asarray(exclude), k, xp=xp))
      got = np.take_along_axis(rows, pos, 1)
      np.testing.assert_array_equal(got, want)
      assert not any(set(g) & set(x[x >= 0]) for g, x in zip(got, exclude))
  with pytest.raises(ValueError, match="M >= k \\+ E"):
    exclude_rows(np.zeros((1, 4), int), np.zeros((1, 2), int), 3, xp=np)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
  from ragjax.training import state as train_state
  from ragjax.training.loop import Run
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  config_lib.apply_overrides(cfg, [
      "data.bios_layout=documents", "data.num_people=30", "data.pretrain.objective=salient_span",
      "data.pretrain.exclude=document", "mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
      "mesh.num_devices=1", "train.tensorboard=false"])
  run = Run(cfg, tmp_path_factory.mktemp("pre"))
  state = train_state.init_state(run.model, run.tx, run.shapes, run.system.host_towers(), 0)
  emb = run.corpus_embeddings(state.params)
  run.feeder.set_corpus(emb)
  return run, state, emb


def test_retrieval_never_returns_the_query_document_and_equals_filtered_brute_force(pretrain_run):
  run, state, emb = pretrain_run
  system = run.system
  assert system.train_questions[0].id.startswith("pretrain-salient_span-")
  host = feed.Feeder(system, run.mesh, run.rules, "exact_host")
  host.set_corpus(emb)
  e = run.feeder.num_excluded
  assert e == max(len(q.exclude_passage_ids) for q in system.train_questions) > 1
  leaked_without_mask = 0
  for start in range(0, 64, 8):
    qs = system.train_questions[start:start + 8]
    excl = run.feeder.exclusion_rows(qs)
    batch = run.feeder.batch(state.params, qs)
    q = np.asarray(run.feeder._encode_fn()(state.params, batch["query_input_ids"],
                                           batch["query_attention_mask"]))
    order = np.argsort(-(q @ emb.T), axis=1, kind="stable")
    leaked_without_mask += sum(bool(set(o[:system.k]) & set(x[x >= 0]))
                               for o, x in zip(order, excl))
    want = _reference_exclude(order, excl, system.k)
    for b in (batch, host.batch(state.params, qs)):
      rows = np.asarray(b["doc_ids"])
      assert rows.shape == (8, system.k)
      np.testing.assert_array_equal(rows, want)
  assert leaked_without_mask > 0   # the unmasked search does retrieve the own document


ONE = ["--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
       "--config.mesh.num_devices=1", "--config.train.tensorboard=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """2 steps of salient-span pretraining with a trainable passage encoder (sync refresh, so the
  workdir publishes index versions)."""
  from ragjax.cli import main
  w = tmp_path_factory.mktemp("pretrained")
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(w),
               "--config.train.total_steps=2", "--config.data.pretrain.objective=salient_span",
               "--config.optim.freeze=()", "--config.model.reencode_passages=true",
               "--config.index.refresh.mode=sync", "--config.index.refresh.schedule=0-10:2",
               *ONE]) == 0
  return w


@pytest.mark.slow  # ~30 s; test_init_towers_takes_only_the_named_towers starts from the same workdir
def test_fine_tuning_starts_from_the_pretraining_towers_and_keeps_its_index(pretrained, tmp_path):
  from ragjax.checkpoint import Checkpointer
  from ragjax.cli import main
  from ragjax.joint import versions
  w2 = tmp_path / "ft"
  # learning rate 0: the fine-tuning checkpoint holds exactly the towers it started from
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(w2),
               "--config.train.total_steps=1", "--config.optim.learning_rate=0.0",
               f"--config.init.from_workdir={pretrained}", "--config.init.index=keep",
               *ONE]) == 0
  src = Checkpointer.reader(pretrained / "checkpoints").restore_subtree(2, ("params",))
  dst = Checkpointer.reader(w2 / "checkpoints").restore_subtree(1, ("params",))
  same = jax.tree.map(np.array_equal, src, dst)
  assert all(jax.tree.leaves(same))
  # init.index=keep: the run started from W's index version of that checkpoint
  from ragjax.training.loop import Run
  cfg = config_lib.load_workdir_config(w2)
  run = Run(cfg, tmp_path / "probe")
  kept = run.initial_embeddings(None)
  version = Checkpointer.reader(pretrained / "checkpoints").metadata(2)["index_version"]
  want, _, _ = versions.load_version(pretrained, version, expect_count=len(kept),
                                     expect_dim=kept.shape[1])
  np.testing.assert_array_equal(kept, want)


def test_fine_tuning_from_an_incompatible_workdir_names_the_keys(pretrained, tmp_path):
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  config_lib.apply_overrides(cfg, [f"init.from_workdir={pretrained}",
                                   "generator.random.d_model=48"])
  with pytest.raises(ConfigError, match=r"init.from_workdir=.*generator\.random\.d_model: 32 "
                                        r"there, 48 here"):
    config_lib.validate(cfg)
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  config_lib.apply_overrides(cfg, [f"init.from_workdir={tmp_path}"])
  with pytest.raises(DataError, match="init.from_workdir.*config.json and checkpoints"):
    config_lib.validate(cfg)


def test_init_towers_takes_only_the_named_towers(pretrained, tmp_path):
  """`init.towers=("generator",)`: the generator from W, the retriever as a fresh run's."""
  from ragjax.checkpoint import Checkpointer
  from ragjax.cli import main
  lr0 = ["--config.train.total_steps=1", "--config.optim.learning_rate=0.0", *ONE]
  fresh, part = tmp_path / "fresh", tmp_path / "part"
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(fresh),
               *lr0]) == 0
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(part), *lr0,
               f"--config.init.from_workdir={pretrained}",
               "--config.init.towers=('generator',)"]) == 0
  read = lambda w, s: Checkpointer.reader(w / "checkpoints").restore_subtree(s, ("params",))
  src, new, base = read(pretrained, 2), read(part, 1), read(fresh, 1)
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert same(new["generator"], src["generator"])
  assert not same(new["generator"], base["generator"])
  assert same(new["bi_encoder"], base["bi_encoder"])
  assert not same(new["bi_encoder"]["query_encoder"], src["bi_encoder"]["query_encoder"])


def test_init_towers_is_checked(pretrained):
  for towers, words in [("('decoder',)", r"init.towers 'decoder': expected one of"),
                        ("('generator',)", r"init.index='keep' needs 'passage_encoder'")]:
    cfg = config_lib.load_config("experiments/bios.py:smoke")
    config_lib.apply_overrides(cfg, [f"init.from_workdir={pretrained}", f"init.towers={towers}",
                                     "init.index=keep"])
    with pytest.raises(ConfigError, match=words):
      config_lib.validate(cfg)


def test_title_sentence_queries_hold_the_title_and_the_masked_sentence_and_never_a_title_span():
  """query="title_sentence": "<title>: <the sentence with its span masked>"; the sentence is
  the passage's, split at . ! ?; a span whose text is in the title (here "Ximena Costa") is
  never the target; the answers are those the passage query form could draw."""
  sentences = ["Ximena Costa was born on 12 March 1987 in Lyon.",
               "She studied physics at the University of Tokyo and earned 3,370 dollars in 2004.",
               "In May 1990 she scored 4.5 of 17."]
  p = Passage("d1-0", "Ximena Costa", TEXT)
  seen = set()
  for seed in range(40):
    [q] = pretraining_examples([p], "salient_span", seed=seed, query="title_sentence")
    title, _, sentence = q.question.partition(": ")
    assert title == "Ximena Costa" and q.question.count("[MASK]") == 1
    assert sentence.replace("[MASK]", q.answers[0]) in sentences
    assert q.answers[0] != "Ximena Costa"
    seen.add(q.answers[0])
  assert seen == {TEXT[a:b] for a, b, _ in salient_spans(TEXT)} - {"Ximena Costa"}
  # Title words, not substrings: "Costa" is a title word, "Acosta" is not; the year of a date
  # is ("born 1961"); "Dr." and "U.S." do not end the sentence; no title, no prefix.
  q = Passage("d2", "Ximena Costa (born 1961) - profile",
              "Dr. Lee met Costa and Acosta in the U.S. Army on 12 March 1961. They left.")
  assert [q.text[a:b] for a, b, _ in salient_spans(q.text)] == ["Costa", "Acosta",
                                                                "12 March 1961"]
  for seed in range(10):
    [e] = pretraining_examples([q], "salient_span", seed=seed, query="title_sentence")
    assert e.answers == ("Acosta",)
    assert e.question == ("Ximena Costa (born 1961) - profile: Dr. Lee met Costa and [MASK] in "
                          "the U.S. Army on 12 March 1961.")
  [e] = pretraining_examples([Passage("d3", "", "He met Lee Park. Then he left.")],
                             "salient_span", query="title_sentence")
  assert e.question == "He met [MASK]." and e.answers == ("Lee Park",)
  with pytest.raises(DataError, match=r"data\.pretrain\.query"):
    pretraining_examples([p], "salient_span", query="sentence")
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  cfg.data.pretrain.objective = "salient_span"
  cfg.data.pretrain.query = "title"
  with pytest.raises(ConfigError, match="data.pretrain.query 'title'"):
    config_lib.validate(cfg, data=True)
  cfg.data.pretrain.objective, cfg.data.pretrain.query = "prefix_lm", "title_sentence"
  with pytest.raises(ConfigError, match="data.pretrain.query='title_sentence': only salient_span"):
    config_lib.validate(cfg, data=True)
