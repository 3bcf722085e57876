"""Inputs and evaluation: left padding is invisible, metrics follow their definitions."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from vlmopt import inputs
from vlmopt.data.dataset import Record, load_records
from vlmopt.errors import VlmoptError
from vlmopt.evaluation import answer_token, evaluate, hf_runner
from vlmopt.frontend.load import load

N_IMAGE = 196  # (112 / 8) ** 2 patches, CLS dropped


@pytest.fixture(scope="module")
def records(synth_data):
    recs = load_records(synth_data)
    assert len(recs) == 10
    return recs


@pytest.fixture(scope="module")
def processor(loaded_tiny):
    return loaded_tiny.processor


@pytest.fixture(scope="module")
def runner(loaded_tiny):
    return hf_runner(loaded_tiny.model)


def _encode(processor, recs, blank=False):
    images = [r.load_image() for r in recs]
    if blank:
        images = [inputs.blank_like(im) for im in images]
    return inputs.encode(processor, [r.prompt for r in recs], images)


# ----------------------------------------------------------------------------- inputs


def test_chat_text_wraps_the_prompt_in_the_checkpoint_template(processor):
    assert inputs.chat_text(processor, "<image>\nHi?") == "USER: <image>\nHi? ASSISTANT:"


def test_encode_left_pads_and_counts_positions_over_real_tokens_only(processor, records):
    batch = _encode(processor, records)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    lengths = mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "the records must have different prompt lengths"
    T = ids.shape[1]
    assert lengths.max() == T
    for row in range(len(records)):
        n = int(lengths[row])
        assert mask[row, :T - n].sum() == 0 and mask[row, T - n:].all()  # left padding
        assert (ids[row, :T - n] == processor.tokenizer.pad_token_id).all()
        assert pos[row, T - n:].tolist() == list(range(n))  # real tokens count from 0
        assert ids[row, T - n] == processor.tokenizer.bos_token_id
    assert ((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(-1) == N_IMAGE).all()
    assert batch["pixel_values"].shape == (len(records), 3, 112, 112)
    assert batch["pixel_values"].dtype == torch.float32


def test_encode_normalizes_pixels_with_mean_and_std_one_half(processor, records):
    im = records[0].load_image()
    px = inputs.encode(processor, [records[0].prompt], [im])["pixel_values"][0]
    expected = (torch.tensor(list(im.getdata()), dtype=torch.float32).T.reshape(3, 112, 112)
                / 255 - 0.5) / 0.5
    torch.testing.assert_close(px, expected, atol=1e-5, rtol=0)


def test_encode_without_processor_is_an_error(records):
    with pytest.raises(VlmoptError, match="processor"):
        inputs.encode(None, [records[0].prompt], [records[0].load_image()])


def test_blank_like_is_flat_grey_of_the_same_size():
    from PIL import Image

    im = Image.new("RGB", (120, 112), (1, 2, 3))
    blank = inputs.blank_like(im)
    assert blank.size == (120, 112) and set(blank.getdata()) == {(128, 128, 128)}


# ----------------------------------------------------------------------------- batching


def test_batched_logits_equal_one_at_a_time_despite_left_padding(processor, records, runner):
    batched = runner(_encode(processor, records))
    single = torch.cat([runner(_encode(processor, [r])) for r in records])
    assert batched.shape == (10, len(processor.tokenizer))
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert not torch.allclose(single[0], single[2], atol=1e-3)  # inputs do matter


def test_batched_evaluation_equals_one_at_a_time(processor, records, runner):
    one = evaluate(runner, records, processor, batch_size=1)
    five = evaluate(runner, records, processor, batch_size=5)
    assert len(one.predictions) == 10
    assert one.predictions == five.predictions
    assert (one.accuracy, one.per_type) == (five.accuracy, five.per_type)
    assert one.n == five.n == 10


# ----------------------------------------------------------------------------- reference metrics


def test_reference_same_model_gives_full_agreement_and_zero_kl(processor, records, runner):
    res = evaluate(runner, records, processor, reference=runner, batch_size=5)
    assert res.agreement == 1.0 and res.kl == pytest.approx(0.0, abs=1e-7)
    assert res.reference == "original"
    selfref = evaluate(runner, records, processor, batch_size=5)
    assert (selfref.agreement, selfref.kl, selfref.reference) == (1.0, 0.0, "self")


def test_agreement_and_kl_against_another_model_follow_their_definitions(
        processor, records, runner, tiny_qwen2_gqa):
    other = hf_runner(load(tiny_qwen2_gqa).model)
    res = evaluate(runner, records, processor, reference=other, batch_size=4)
    batch = _encode(processor, records)
    run_logp, ref_logp = F.log_softmax(runner(batch), -1), F.log_softmax(other(batch), -1)
    kl_ref_run = (ref_logp.exp() * (ref_logp - run_logp)).sum(-1)  # KL(reference || runner)
    kl_run_ref = (run_logp.exp() * (run_logp - ref_logp)).sum(-1)
    assert res.kl > 0.01
    assert res.kl == pytest.approx(kl_ref_run.mean().item(), rel=1e-4)
    assert res.kl != pytest.approx(kl_run_ref.mean().item(), rel=1e-3)  # the direction matters
    agree = (run_logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
    assert res.agreement == pytest.approx(agree)


def test_blank_image_with_reference_gives_positive_kl(processor, records, runner):
    res = evaluate(runner, records, processor, reference=runner, blank_image=True,
                   batch_size=5)
    assert res.kl > 1e-4


class Spy:
    """A runner that answers from a table of record answers and records what it was fed."""

    def __init__(self, tokenizer, answers, vocab):
        self.tok, self.answers, self.vocab, self.batches = tokenizer, list(answers), vocab, []

    def __call__(self, batch):
        self.batches.append(batch)
        logits = torch.zeros(len(batch["input_ids"]), self.vocab)
        for row in range(len(logits)):
            logits[row, answer_token(self.tok, self.answers.pop(0))] = 5.0
        return logits


def test_blank_image_feeds_grey_to_the_runner_and_real_images_to_the_reference(
        processor, records):
    tok, V = processor.tokenizer, len(processor.tokenizer)
    run, ref = Spy(tok, ["red"] * 10, V), Spy(tok, ["red"] * 10, V)
    evaluate(run, records, processor, reference=ref, blank_image=True, batch_size=5)
    grey = (128 / 255 - 0.5) / 0.5
    for b in run.batches:
        torch.testing.assert_close(b["pixel_values"], torch.full_like(b["pixel_values"], grey))
    real = torch.cat([b["pixel_values"] for b in ref.batches])
    torch.testing.assert_close(real, _encode(processor, records)["pixel_values"])
    assert real.std() > 0.05


# ----------------------------------------------------------------------------- accuracy


def test_oracle_runner_scores_full_accuracy_and_predicts_the_answers(processor, records):
    tok, V = processor.tokenizer, len(processor.tokenizer)
    seen = []
    res = evaluate(Spy(tok, [r.answer for r in records], V), records, processor, batch_size=3,
                   progress=seen.append)
    assert res.accuracy == 1.0
    assert res.per_type == {t: 1.0 for t in sorted({r.type for r in records})}
    assert res.predictions == [r.answer for r in records]
    assert seen == [3, 3, 3, 1]


def test_accuracy_is_per_type_and_overall_over_labelled_records(processor, records):
    tok, V = processor.tokenizer, len(processor.tokenizer)
    # right only on "colour" and "glyph" records
    answers = [r.answer if r.type in ("colour", "glyph") else "zzz-wrong" for r in records]
    answers = [a if a != "zzz-wrong" else ("no" if r.answer != "no" else "yes")
               for a, r in zip(answers, records)]
    res = evaluate(Spy(tok, answers, V), records, processor, batch_size=4)
    n_right = sum(r.type in ("colour", "glyph") for r in records)
    assert res.accuracy == pytest.approx(n_right / len(records))
    for t, acc in res.per_type.items():
        assert acc == (1.0 if t in ("colour", "glyph") else 0.0), t
    types = Counter(r.type for r in records)
    for t, rate in res.majority_per_type.items():
        answers_t = [r.answer for r in records if r.type == t]
        assert rate == pytest.approx(Counter(answers_t).most_common(1)[0][1] / types[t])


def test_unlabelled_records_have_no_accuracy(processor, records):
    unlabelled = [Record(r.image, r.prompt, None, None, r.where) for r in records[:3]]
    tok, V = processor.tokenizer, len(processor.tokenizer)
    res = evaluate(Spy(tok, ["red"] * 3, V), unlabelled, processor)
    assert res.accuracy is None and res.per_type == {}
    assert res.predictions == ["red"] * 3
