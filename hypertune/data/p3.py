"""P3 / T0: promptsource templates rendered with pyyaml + jinja2, and prompted files.

* `load_templates(dir, dataset, subset)` reads a promptsource ``templates.yaml``
  (its ``!Template`` / ``!TemplateMetadata`` tags are read as plain mappings).
* `Template.apply(example)` renders (prompt, target) and the answer choices exactly as
  promptsource 0.2.3 does: same jinja environment (``zip`` global, ``choice`` /
  ``most_frequent`` filters; ``choice`` seeded per example here, so renders are
  deterministic), ``|||`` separating prompt and target, parts stripped.
* Raw readers turn the held-out datasets' released files into the HuggingFace field
  layout the templates expect (ANLI, HellaSwag, SuperGLUE CB/COPA/RTE/WiC/WSC,
  WinoGrande).
* `read_prompted_jsonl` reads the T0 training sample (``prompt``/``completion``,
  completion ending in ``<|endoftext|>``); `read_p3_tfrecords` reads bigscience's
  released P3 TFRecords (``inputs_pretokenized``, ``targets_pretokenized``,
  ``answer_choices``, ``is_correct``).
* `HYPERT5_TRAIN_PROMPTS` is HyperT5's Figure 6 list of training dataset-prompts.
* `parse_heldout_task_name` reads (mode prefix, dataset, template) back from a held-out
  task name (``p3.super_glue_rte_GPT_3_style``); `PAPER_COLUMNS` are the papers' table
  columns (ANLI one column over its rounds), used by `hypertune.metrics` for the headline
  average.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

from hypertune.data import fewshot

TEMPLATE_SEP = "|||"


class P3Error(ValueError):
  """Bad template or data; the message names the file, the task and the field."""


# -- templates -------------------------------------------------------------------

@dataclasses.dataclass
class Template:
  id: str
  name: str
  jinja: str
  answer_choices: Optional[str]
  original_task: bool
  choices_in_prompt: bool
  source: str  # templates.yaml path, for error messages
  _cache: object = dataclasses.field(default=None, repr=False, compare=False)
  _rng: object = dataclasses.field(default=None, repr=False, compare=False)

  def _compiled(self):
    """Jinja templates compiled once; the `choice` filter draws from self._rng."""
    if getattr(self, "_cache", None) is None:
      import jinja2  # pylint: disable=g-import-not-at-top
      env = jinja2.Environment(loader=jinja2.BaseLoader())
      env.globals.update(zip=zip)
      env.filters["choice"] = lambda seq: self._rng.choice(list(seq))
      env.filters["most_frequent"] = lambda items: max(set(items), key=list(items).count)
      env.filters["highlight"] = lambda x: x
      try:
        self._cache = (env.from_string(self.jinja),
                       env.from_string(self.answer_choices) if self.answer_choices else None)
      except jinja2.TemplateError as e:
        raise P3Error(f"{self.source}: template {self.name!r} ({self.id}), field 'jinja': "
                      f"cannot compile: {e}") from e
    return self._cache

  def apply(self, example: dict, seed: int = 0) -> Tuple[str, str, Optional[List[str]]]:
    """Renders (prompt, target, answer_choices) for one raw example.

    The target (or prompt) is "" when the template does not apply to the example
    (e.g. COPA "effect" templates on "cause" questions); T0 drops such examples.
    """
    import jinja2  # pylint: disable=g-import-not-at-top
    prompt_t, choices_t = self._compiled()
    self._rng = random.Random(fewshot.stable_seed("p3", self.id, seed))
    try:
      choices = None
      if choices_t is not None:
        choices = [c.strip() for c in choices_t.render(**example).split(TEMPLATE_SEP)]
      ctx = dict(example)
      ctx["answer_choices"] = choices
      text = prompt_t.render(**ctx)
    except (jinja2.TemplateError, TypeError, KeyError, IndexError) as e:
      raise P3Error(f"{self.source}: template {self.name!r} ({self.id}), field 'jinja': "
                    f"cannot render: {e!r}") from e
    parts = [p.strip() for p in text.split(TEMPLATE_SEP)]
    prompt = parts[0]
    target = parts[1] if len(parts) > 1 else ""
    return prompt, target, choices


def _yaml_loader():
  import yaml  # pylint: disable=g-import-not-at-top

  class Loader(yaml.SafeLoader):
    pass

  def mapping(loader, node):
    return loader.construct_mapping(node, deep=True)

  Loader.add_constructor("!Template", mapping)
  Loader.add_constructor("!TemplateMetadata", mapping)
  return Loader


def templates_path(templates_dir: str, dataset: str, subset: Optional[str] = None) -> str:
  parts = [templates_dir, dataset] + ([subset] if subset else []) + ["templates.yaml"]
  return os.path.join(*parts)


def load_templates(templates_dir: str, dataset: str, subset: Optional[str] = None
                   ) -> Dict[str, Template]:
  """{template name: Template} of one promptsource dataset(/subset)."""
  import yaml  # pylint: disable=g-import-not-at-top
  path = templates_path(templates_dir, dataset, subset)
  if not os.path.exists(path):
    raise P3Error(f"{path}: no promptsource templates for dataset {dataset!r} subset {subset!r}")
  with open(path, encoding="utf-8") as f:
    try:
      raw = yaml.load(f, Loader=_yaml_loader())
    except yaml.YAMLError as e:
      raise P3Error(f"{path}: dataset {dataset!r}, field '<yaml>': bad YAML: {e}") from e
  if not isinstance(raw, dict) or not isinstance(raw.get("templates"), dict):
    raise P3Error(f"{path}: dataset {dataset!r}, field 'templates': missing or not a mapping")
  out = {}
  for tid, t in raw["templates"].items():
    for field in ("name", "jinja"):
      if not isinstance(t, dict) or not isinstance(t.get(field), str):
        raise P3Error(f"{path}: dataset {dataset!r}, template {tid}, field {field!r}: missing")
    meta = t.get("metadata") or {}
    out[t["name"]] = Template(
        id=str(tid), name=t["name"], jinja=t["jinja"], answer_choices=t.get("answer_choices"),
        original_task=bool(meta.get("original_task")),
        choices_in_prompt=bool(meta.get("choices_in_prompt")), source=path)
  return out


def get_template(templates: Dict[str, Template], name: str, where: str) -> Template:
  if name not in templates:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(name, list(templates), n=3)
    raise P3Error(f"{where}: unknown template {name!r}; close matches: {close}")
  return templates[name]


def sanitize(name: str) -> str:
  """A template/dataset name as a seqio-safe identifier (T0 naming)."""
  return re.sub(r"[^\w]+", "_", name).strip("_")


# -- held-out evaluation datasets -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HeldoutDataset:
  """One T0 held-out evaluation dataset and where its files live under p3/."""

  key: str  # our name, e.g. "anli_r1"
  dataset: str  # promptsource dataset
  subset: Optional[str]
  eval_file: str  # relative to the p3 data dir
  demo_file: Optional[str]  # disjoint examples for few-shot demonstrations
  reader: str
  column: Optional[str] = None  # the papers' table column when not `key` (ANLI rounds)

  @property
  def paper_column(self) -> str:
    return self.column or self.key


HELDOUT_DATASETS = (
    HeldoutDataset("anli_r1", "anli", None, "anli_v1.0/R1/dev.jsonl", "anli_v1.0/R1/test.jsonl", "anli", "anli"),
    HeldoutDataset("anli_r2", "anli", None, "anli_v1.0/R2/dev.jsonl", "anli_v1.0/R2/test.jsonl", "anli", "anli"),
    HeldoutDataset("anli_r3", "anli", None, "anli_v1.0/R3/dev.jsonl", "anli_v1.0/R3/test.jsonl", "anli", "anli"),
    HeldoutDataset("hellaswag", "hellaswag", None, "hellaswag/hellaswag_val_preprocessed.jsonl", None, "hellaswag"),
    HeldoutDataset("super_glue_cb", "super_glue", "cb", "superglue_fewglue32dev/CB/val.jsonl", "superglue_fewglue32dev/CB/train.jsonl", "cb"),
    HeldoutDataset("super_glue_copa", "super_glue", "copa", "superglue_fewglue32dev/COPA/val.jsonl", "superglue_fewglue32dev/COPA/train.jsonl", "copa"),
    HeldoutDataset("super_glue_rte", "super_glue", "rte", "superglue_fewglue32dev/RTE/val.jsonl", "superglue_fewglue32dev/RTE/train.jsonl", "rte"),
    HeldoutDataset("super_glue_wic", "super_glue", "wic", "superglue_fewglue32dev/WiC/val.jsonl", "superglue_fewglue32dev/WiC/train.jsonl", "wic"),
    HeldoutDataset("super_glue_wsc.fixed", "super_glue", "wsc.fixed", "superglue_fewglue32dev/WSC/val.jsonl", "superglue_fewglue32dev/WSC/train.jsonl", "wsc"),
    HeldoutDataset("winogrande", "winogrande", "winogrande_xl", "winogrande_1.1/dev.jsonl", "winogrande_1.1/train_xs.jsonl", "winogrande"),
)
# HellaSwag ships only the validation set here: its last examples are the demo pool.
HELLASWAG_DEMO_POOL = 64

_HELDOUT_BY_KEY = {h.key: h for h in HELDOUT_DATASETS}
# Task name prefix of each hyper_mode (tasks/p3.py): ``<prefix>.<dataset key>_<template>``.
MODE_PREFIXES = {"hyper": "p3", "concat": "p3_concat", "none": "p3_zeroshot"}
# HyperT5 Tables 1-2 / T0: ANLI, HSwag, CB, COPA, RTE, WiC, WSC, WGD (ANLI over R1-R3).
PAPER_COLUMNS = tuple(dict.fromkeys(h.paper_column for h in HELDOUT_DATASETS))
_HELDOUT_TASK = re.compile(r"^(%s)\.(%s)_(\w+)$" % (
    "|".join(map(re.escape, MODE_PREFIXES.values())),
    # Longest first: were one key the start of another, the longer one wins.
    "|".join(re.escape(h.key) for h in sorted(HELDOUT_DATASETS, key=lambda h: -len(h.key)))))


def parse_heldout_task_name(name: str) -> Optional[Tuple[str, str, str]]:
  """(mode prefix, dataset key, sanitized template) of a held-out task name, else None.

  ``p3_concat.super_glue_wsc.fixed_GPT_3_Style`` -> ("p3_concat", "super_glue_wsc.fixed",
  "GPT_3_Style"); training tasks (``p3.train.<prompt>``) and other sources give None.
  """
  m = _HELDOUT_TASK.match(name)
  return m.groups() if m else None


def paper_column(key: str) -> str:
  """The papers' table column of a HELDOUT_DATASETS key ("anli_r2" -> "anli")."""
  return _HELDOUT_BY_KEY[key].paper_column

_CB = {"entailment": 0, "contradiction": 1, "neutral": 2}
_RTE = {"entailment": 0, "not_entailment": 1}
_ANLI = {"e": 0, "n": 1, "c": 2}


def _read_jsonl(path: str) -> List[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise P3Error(f"{path}: line {i + 1}: bad JSON: {e}") from e
  return rows


def _field(row, key, path, i):
  if key not in row:
    raise P3Error(f"{path}: example {i}: field {key!r} missing")
  return row[key]


def read_heldout_raw(path: str, reader: str) -> List[dict]:
  """Rows of a held-out dataset file in HuggingFace field layout (label int)."""
  rows = _read_jsonl(path)
  out = []
  for i, r in enumerate(rows):
    f = lambda k: _field(r, k, path, i)  # pylint: disable=cell-var-from-loop
    if reader == "anli":
      ex = {"uid": f("uid"), "premise": f("context"), "hypothesis": f("hypothesis"),
            "label": _ANLI[f("label")], "reason": r.get("reason", "")}
    elif reader == "cb":
      ex = {"premise": f("premise"), "hypothesis": f("hypothesis"), "label": _CB[f("label")],
            "idx": r.get("idx", i)}
    elif reader == "rte":
      ex = {"premise": f("premise"), "hypothesis": f("hypothesis"), "label": _RTE[f("label")],
            "idx": r.get("idx", i)}
    elif reader == "copa":
      ex = {k: f(k) for k in ("premise", "choice1", "choice2", "question")}
      ex.update(label=int(f("label")), idx=r.get("idx", i))
    elif reader == "wic":
      ex = {k: f(k) for k in ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2")}
      ex.update(label=int(bool(f("label"))), idx=r.get("idx", i))
    elif reader == "wsc":
      t = f("target")
      ex = {"text": f("text"), "span1_index": t["span1_index"], "span2_index": t["span2_index"],
            "span1_text": t["span1_text"], "span2_text": t["span2_text"],
            "label": int(bool(f("label"))), "idx": r.get("idx", i)}
    elif reader == "winogrande":
      ex = {k: f(k) for k in ("sentence", "option1", "option2", "answer")}
    elif reader == "hellaswag":
      # The released preprocessed text has lost the ctx_a/ctx_b split: ctx_a = ctx.
      ex = {"ind": r.get("ind", i), "activity_label": f("activity_label"), "ctx": f("ctx"),
            "ctx_a": f("ctx"), "ctx_b": "", "endings": f("endings"), "label": str(f("label"))}
    else:
      raise ValueError(f"unknown reader {reader!r}")
    out.append(ex)
  return out


def render_choice_examples(
    rows: Sequence[dict], template: Template, task_name: str, seed: int = 0
) -> List[fewshot.TaskExample]:
  """Renders rows with a choice template into TaskExamples with answer_choices/label.

  The gold index is the position of the rendered target among the rendered choices.
  Examples the template renders empty for are dropped (as in T0); ids keep the row index.
  """
  out = []
  for i, row in enumerate(rows):
    prompt, target, choices = template.apply(row, seed=fewshot.stable_seed(seed, i))
    if not prompt or not target:
      continue  # The template does not apply to this example (T0 drops these).
    if not choices:
      raise P3Error(f"{template.source}: task {task_name}, template {template.name!r}, field "
                    "'answer_choices': none (not a rank-classification template)")
    if target not in choices:
      raise P3Error(f"{template.source}: task {task_name}, example {i}, field 'label': target "
                    f"{target!r} is not among answer choices {choices}")
    out.append(fewshot.TaskExample(prompt, (target,), tuple(choices), choices.index(target), str(i)))
  return out


# -- training data ------------------------------------------------------------------

EOT = "<|endoftext|>"


def read_prompted_jsonl(path: str) -> List[fewshot.TaskExample]:
  """A T0 training sample file: {"prompt", "completion"} per line."""
  out = []
  for i, r in enumerate(_read_jsonl(path)):
    prompt, completion = _field(r, "prompt", path, i), _field(r, "completion", path, i)
    if not isinstance(prompt, str) or not isinstance(completion, str):
      raise P3Error(f"{path}: example {i}: fields 'prompt'/'completion' must be strings")
    if completion.endswith(EOT):
      completion = completion[: -len(EOT)]
    out.append(fewshot.TaskExample(prompt.strip(), (completion.strip(),), id=str(i)))
  return out


def read_p3_tfrecords(path_pattern: str) -> List[fewshot.TaskExample]:
  """bigscience P3 TFRecords: inputs/targets_pretokenized (+answer_choices, is_correct).

  Rank-classification ("_score_eval") files have one record per (example, choice)
  with is_correct; those are grouped back (consecutive records sharing
  inputs_pretokenized) into one example with answer_choices and label.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(path_pattern))
  if not files:
    raise P3Error(f"{path_pattern}: no P3 TFRecord files")
  spec = {
      "inputs_pretokenized": tf.io.FixedLenFeature([], tf.string),
      "targets_pretokenized": tf.io.FixedLenFeature([], tf.string),
      "answer_choices": tf.io.VarLenFeature(tf.string),
      "is_correct": tf.io.VarLenFeature(tf.int64),
  }
  out: List[fewshot.TaskExample] = []
  pending, choices_of_pending = None, ()
  for rec in tf.data.TFRecordDataset(files).as_numpy_iterator():
    try:
      ex = tf.io.parse_single_example(rec, spec)
    except tf.errors.InvalidArgumentError as e:
      raise P3Error(f"{files[0]}: field 'inputs_pretokenized/targets_pretokenized': {e}") from e
    inp = ex["inputs_pretokenized"].numpy().decode("utf-8").strip()
    tgt = ex["targets_pretokenized"].numpy().decode("utf-8").strip()
    choices = tuple(c.decode("utf-8").strip() for c in ex["answer_choices"].values.numpy())
    corr = ex["is_correct"].values.numpy()
    if len(corr):  # score_eval layout: one record per choice
      if pending and pending[0] == inp:
        pending[1].append((tgt, bool(corr[0])))
      else:
        if pending:
          out.append(_group(pending, choices_of_pending))
        pending, choices_of_pending = (inp, [(tgt, bool(corr[0]))]), choices
      continue
    label = choices.index(tgt) if tgt in choices else -1
    out.append(fewshot.TaskExample(inp, (tgt,), choices if label >= 0 else (), label, str(len(out))))
  if pending:
    out.append(_group(pending, choices_of_pending))
  return out


def _group(pending, choices):
  inp, rows = pending
  gold = [t for t, c in rows if c]
  target = gold[0] if gold else rows[0][0]
  choices = choices or tuple(t for t, _ in rows)
  return fewshot.TaskExample(inp, (target,), choices, choices.index(target) if target in choices else -1)


def normalize_prompt_name(name: str) -> str:
  """Key to match T0 dataset-prompt names across '.'/'_' and case differences."""
  n = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
  return _ALIASES.get(n, n)


# Spelling differences between the HyperT5 Figure 6 list and the released files.
_ALIASES = {
    "samsun_generate_a_summary_for_this_dialogue": "samsum_generate_a_summary_for_this_dialogue",
    "samsun_given_the_above_dialogue_write_a_summary": "samsum_given_the_above_dialogue_write_a_summary",
    "samsun_sum_up_the_following_dialogue": "samsum_sum_up_the_following_dialogue",
    "samsun_summarize": "samsum_summarize",
    "samsun_summarize_this_dialogue": "samsum_summarize_this_dialogue",
    "samsun_to_sum_up_this_dialog": "samsum_to_sum_up_this_dialog",
    "samsun_write_a_dialogue_that_match_this_summary": "samsum_write_a_dialogue_that_match_this_summary",
    "kilt_tasks_hotpotqa_straightforward_qa": "kilt_tasks_hotpotqa_straighforward_qa",
}

# HyperT5 (Phang et al. 2022) Figure 6: P3 dataset-prompts used for training (T0-train
# subset with average input length < 320 tokens), verbatim.
HYPERT5_TRAIN_PROMPTS = tuple("""
adversarial_qa_dbert_answer_the_following_q adversarial_qa_dbert_based_on adversarial_qa_dbert_generate_question
adversarial_qa_dbert_question_context_answer adversarial_qa_dbert_tell_what_it_is adversarial_qa_dbidaf_answer_the_following_q
adversarial_qa_dbidaf_based_on adversarial_qa_dbidaf_generate_question adversarial_qa_dbidaf_question_context_answer
adversarial_qa_dbidaf_tell_what_it_is adversarial_qa_droberta_answer_the_following_q adversarial_qa_droberta_based_on
adversarial_qa_droberta_generate_question adversarial_qa_droberta_question_context_answer adversarial_qa_droberta_tell_what_it_is
ag_news_classify ag_news_classify_question_first ag_news_classify_with_choices ag_news_classify_with_choices_question_first
ag_news_recommend ag_news_which_section ag_news_which_section_choices amazon_polarity_Is_this_product_review_positive
amazon_polarity_Is_this_review amazon_polarity_Is_this_review_negative amazon_polarity_User_recommend_this_product
amazon_polarity_convey_negative_or_positive_sentiment amazon_polarity_flattering_or_not amazon_polarity_negative_or_positive_tone
amazon_polarity_user_satisfied amazon_polarity_would_you_buy app_reviews_categorize_rating_using_review
app_reviews_convert_to_rating app_reviews_convert_to_star_rating app_reviews_generate_review cnn_dailymail_3.0.0_generate_story
cnn_dailymail_3.0.0_spice_up_story common_gen_Example_prompt common_gen_Given_concepts_type_1 common_gen_Given_concepts_type_2
common_gen_Put_together common_gen_choice_in_concept_centric_sentence_generation common_gen_random_task_template_prompt
common_gen_sentence_to_concepts common_gen_topic_to_sentence common_gen_topics_from_the_sentence
cos_e_v1.11_aligned_with_common_sense cos_e_v1.11_generate_question_option_id cos_e_v1.11_description_question_option_text
cos_e_v1.11_explain_why_human cos_e_v1.11_generate_explanation_given_text cos_e_v1.11_i_think
cos_e_v1.11_question_description_option_id cos_e_v1.11_question_description_option_text
cos_e_v1.11_question_option_description_id cos_e_v1.11_question_option_description_text cos_e_v1.11_rationale
cosmos_qa_context_answer_to_question cosmos_qa_context_description_question_answer_id
cosmos_qa_context_description_question_answer_text cosmos_qa_context_description_question_text
cosmos_qa_context_question_description_answer_id cosmos_qa_context_question_description_answer_text
cosmos_qa_context_question_description_text cosmos_qa_description_context_question_answer_id
cosmos_qa_description_context_question_answer_text cosmos_qa_description_context_question_text cosmos_qa_no_prompt_id
cosmos_qa_no_prompt_text cosmos_qa_only_question_answer dbpedia_14_given_a_choice_of_categories_
dbpedia_14_given_a_list_of_category_what_does_the_title_belong_to dbpedia_14_given_list_what_category_does_the_paragraph_belong_to
dbpedia_14_pick_one_category_for_the_following_text dream_answer_to_dialogue dream_baseline dream_generate_first_utterance
dream_generate_last_utterance dream_read_the_following_conversation_and_answer_the_question duorc_ParaphraseRC_build_story_around_qa
duorc_SelfRC_build_story_around_qa gigaword_TLDR gigaword_first_sentence_title gigaword_generate_summary_for_this
gigaword_in_a_nutshell gigaword_make_a_title gigaword_reverse_writing gigaword_write_a_title_for_this_sentence
gigaword_write_an_article gigaword_write_its_sentence glue_mrpc_equivalent glue_mrpc_generate_paraphrase
glue_mrpc_generate_sentence glue_mrpc_paraphrase glue_mrpc_replace glue_mrpc_same_thing glue_mrpc_want_to_know
glue_qqp_answer glue_qqp_duplicate glue_qqp_duplicate_or_not glue_qqp_meaning glue_qqp_quora glue_qqp_same_thing
imdb_Movie_Expressed_Sentiment imdb_Movie_Expressed_Sentiment_2 imdb_Negation_template_for_positive_and_negative
imdb_Reviewer_Enjoyment imdb_Reviewer_Enjoyment_Yes_No imdb_Reviewer_Expressed_Sentiment imdb_Reviewer_Opinion_bad_good_choices
imdb_Reviewer_Sentiment_Feeling imdb_Sentiment_with_choices_ imdb_Text_Expressed_Sentiment imdb_Writer_Expressed_Sentiment
kilt_tasks_hotpotqa_combining_facts kilt_tasks_hotpotqa_complex_question kilt_tasks_hotpotqa_final_exam
kilt_tasks_hotpotqa_formulate kilt_tasks_hotpotqa_straightforward_qa paws_labeled_final_Concatenation
paws_labeled_final_Concatenation_no_label paws_labeled_final_Meaning paws_labeled_final_Meaning_no_label
paws_labeled_final_PAWS_ANLI_GPT3 paws_labeled_final_PAWS_ANLI_GPT3_no_label paws_labeled_final_Rewrite
paws_labeled_final_Rewrite_no_label paws_labeled_final_context_question paws_labeled_final_context_question_no_label
paws_labeled_final_paraphrase_task paws_labeled_final_task_description_no_label qasc_is_correct_1 qasc_is_correct_2
qasc_qa_with_combined_facts_1 qasc_qa_with_separated_facts_1 qasc_qa_with_separated_facts_2 qasc_qa_with_separated_facts_3
qasc_qa_with_separated_facts_4 qasc_qa_with_separated_facts_5 quarel_choose_between quarel_do_not_use quarel_heres_a_story
quarel_logic_test quarel_testing_students quartz_answer_question_based_on quartz_answer_question_below
quartz_given_the_fact_answer_the_q quartz_having_read_above_passage quartz_paragraph_question_plain_concat
quartz_read_passage_below_choose quartz_use_info_from_paragraph_question quartz_use_info_from_question_paragraph
ropes_background_new_situation_answer ropes_background_situation_middle ropes_given_background_situation
ropes_new_situation_background_answer ropes_plain_background_situation ropes_plain_bottom_hint ropes_plain_no_background
ropes_prompt_beginning ropes_prompt_bottom_hint_beginning ropes_prompt_bottom_no_hint ropes_prompt_mix
ropes_read_background_situation rotten_tomatoes_Movie_Expressed_Sentiment rotten_tomatoes_Movie_Expressed_Sentiment_2
rotten_tomatoes_Reviewer_Enjoyment rotten_tomatoes_Reviewer_Enjoyment_Yes_No rotten_tomatoes_Reviewer_Expressed_Sentiment
rotten_tomatoes_Reviewer_Opinion_bad_good_choices rotten_tomatoes_Reviewer_Sentiment_Feeling
rotten_tomatoes_Sentiment_with_choices_ rotten_tomatoes_Text_Expressed_Sentiment rotten_tomatoes_Writer_Expressed_Sentiment
samsun_Generate_a_summary_for_this_dialogue samsun_Given_the_above_dialogue_write_a_summary samsun_Sum_up_the_following_dialogue
samsun_Summarize_ samsun_Summarize_this_dialogue_ samsun_To_sum_up_this_dialog samsun_Write_a_dialogue_that_match_this_summary
sciq_Direct_Question sciq_Direct_Question_Closed_Book_ sciq_Multiple_Choice sciq_Multiple_Choice_Closed_Book_
sciq_Multiple_Choice_Question_First social_i_qa_Check_if_a_random_answer_is_valid_or_not social_i_qa_Generate_answer
social_i_qa_Generate_the_question_from_the_answer social_i_qa_I_was_wondering social_i_qa_Show_choices_and_generate_answer
social_i_qa_Show_choices_and_generate_index trec_fine_grained_ABBR trec_fine_grained_ABBR_context_first trec_fine_grained_DESC
trec_fine_grained_DESC_context_first trec_fine_grained_ENTY trec_fine_grained_HUM trec_fine_grained_HUM_context_first
trec_fine_grained_LOC trec_fine_grained_LOC_context_first trec_fine_grained_NUM trec_fine_grained_NUM_context_first
trec_fine_grained_open trec_fine_grained_open_context_first trec_pick_the_best_descriptor trec_trec1 trec_trec2
trec_what_category_best_describe trec_which_category_best_describes wiki_bio_comprehension wiki_bio_guess_person
wiki_bio_key_content wiki_bio_what_content wiki_bio_who wiki_qa_Decide_good_answer wiki_qa_Direct_Answer_to_Question
wiki_qa_Generate_Question_from_Topic wiki_qa_Is_This_True_ wiki_qa_Jeopardy_style wiki_qa_Topic_Prediction_Answer_Only
wiki_qa_Topic_Prediction_Question_Only wiki_qa_Topic_Prediction_Question_and_Answer_Pair wiki_qa_automatic_system
wiki_qa_exercise wiki_qa_found_on_google wiqa_does_the_supposed_perturbation_have_an_effect wiqa_effect_with_label_answer
wiqa_effect_with_string_answer wiqa_what_is_the_final_step_of_the_following_process wiqa_what_is_the_missing_first_step
wiqa_what_might_be_the_first_step_of_the_process wiqa_what_might_be_the_last_step_of_the_process
wiqa_which_of_the_following_is_the_supposed_perturbation yelp_review_full_based_on_that yelp_review_full_format_rating
yelp_review_full_format_score yelp_review_full_format_star yelp_review_full_on_a_scale yelp_review_full_so_i_would
yelp_review_full_this_place
""".split())
