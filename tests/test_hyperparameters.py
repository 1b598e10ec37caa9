"""Every method's defaults are the values its paper or official code uses, transcribed here independently of the
plugins (a changed default moves every number a method prints, and no other test would notice).

Sources: ``../shared/REFERENCE.md`` §1 (preprocessing) and §2 (Slerp, Slerp+TAT, Pic2Word, SEARLE, FTI4CIR), and
SEARLE's official argparse defaults (``src/oti_inversion.py`` and ``src/train_phi.py`` at miccunifi/SEARLE), and
LinCIR's (``train_phi.py`` at navervision/lincir, with its README's training command), and TransAgg's
(``config.py``, ``main.py`` and ``utils.py``'s ``get_optimizer`` at Code-kunkun/ZS-CIR), and PLI's
(``options/command_line.py`` and the README's ViT-L/14 targetpad command, whose checkpoint was released, at
Chen-Junyang-cn/PLI), Context-I2W's (``src/params.py`` at Pter61/context-i2w) and RTD's (``run.sh`` and
``train_text_encoder.py`` at jaeseokbyun/RTD), KEDs' (``src/eval_utils.py`` at suoych/KEDs) and CompoDiff's (its
README's CIR usage and ``demo_search.py`` at navervision/CompoDiff).
Where a source leaves a value open (TAT's temperature and LoRA targets, SEARLE's Phi schedule) nothing is asserted.
"""

from __future__ import annotations

import pytest

from cirbench.plugins import get_registry

# (method, option, value, source)
OPTIONS = [
    ("slerp", "alpha", {"cirr": 0.9, "circo": 0.8, "fashioniq": 0.8}, "REFERENCE §2 Slerp: defaults [paper-notes]"),
    ("slerp-tat", "alpha", {"cirr": 0.9, "circo": 0.8, "fashioniq": 0.8}, "REFERENCE §2: Slerp on the tuned encoder"),
    ("searle-oti", "oti_steps", 350, "oti_inversion.py --oti-steps"),
    ("searle-oti", "oti_lr", 2e-2, "oti_inversion.py --learning-rate"),
    ("searle-oti", "oti_weight_decay", 0.01, "oti_inversion.py --weight-decay"),
    ("searle-oti", "oti_batch_size", 32, "oti_inversion.py --batch-size"),
    ("searle-oti", "top_k", 15, "oti_inversion.py --top-k"),
    ("searle-oti", "lambda_gpt", 0.5, "oti_inversion.py --lambda_gpt"),
    ("searle-oti", "lambda_cos", 1.0, "oti_inversion.py --lambda_cos"),
    ("searle-oti", "ema_decay", 0.99, "oti_inversion.py --ema-decay"),
    ("searle-oti", "oti_seed", 42, "oti_inversion.py --seed"),
    ("pli", "image_weight", 0.25, "PLI README CLIP commands: --img_weight=0.25"),
    ("keds", "neighbours", 16, "KEDs eval_utils.py get_retrieved_features(topk=16)"),
    ("keds", "text_stream_weight", 0.5, "KEDs eval_utils.py evaluate_cirr: 0.5 x each stream"),
    ("compodiff", "steps", 10, "CompoDiff README CIR usage: timesteps=10; demo_search.py steps 10"),
    ("compodiff", "image_scale", 1.5, "CompoDiff README CIR usage / demo_search.py cfg_image_scale 1.5"),
    ("compodiff", "text_scale", 7.5, "CompoDiff README CIR usage / demo_search.py cfg_text_scale 7.5"),
    ("compodiff", "samples", 2, "CompoDiff README / demo_search.py num_samples_per_batch=2"),
    ("compodiff", "source_weight", 0.1, "CompoDiff demo_search.py source_mixing_weight 0.1"),
]

# (method, training option, value, source)
TRAIN_OPTIONS = [
    ("slerp-tat", "lora_rank", 16, "REFERENCE §2 TAT: rank 16"),
    ("slerp-tat", "lora_alpha", 16.0, "REFERENCE §2 TAT: LoRA-alpha 16"),
    ("slerp-tat", "lora_dropout", 0.1, "REFERENCE §2 TAT: dropout 0.1"),
    ("pic2word", "middle_dim", 512, "REFERENCE §2 Pic2Word: Linear(d->512)"),
    ("pic2word", "dropout", 0.1, "REFERENCE §2 Pic2Word: Dropout(0.1)"),
    ("searle", "dropout", 0.5, "REFERENCE §2 SEARLE: Dropout(0.5); train_phi.py --phi-dropout"),
    ("searle", "top_k_concepts", 150, "train_phi.py --top-k-concepts"),
    ("searle", "lambda_distil", 1.0, "train_phi.py --lambda-distil"),
    ("searle", "lambda_gpt", 0.75, "train_phi.py --lambda-gpt"),
    ("searle", "temperature", 0.25, "train_phi.py --temperature"),
    ("fti4cir", "num_queries", 24, "REFERENCE §2 FTI4CIR: 24 learnable queries"),
    ("fti4cir", "layers", 3, "REFERENCE §2 FTI4CIR: 3-layer transformer"),
    ("fti4cir", "threshold", 0.05, "REFERENCE §2 FTI4CIR: keep those > 0.05"),
    ("fti4cir", "max_attributes", 12, "REFERENCE §2 FTI4CIR: at most 12"),
    ("fti4cir", "temperature", 0.2, "REFERENCE §2 FTI4CIR: contrastive tau = 0.2"),
    ("fti4cir", "reg_weight", 1.4, "REFERENCE §2 FTI4CIR: 1.4 x (three cosine regularisers)"),
    ("lincir", "dropout", 0.5, "lincir train_phi.py --phi_dropout"),
    ("lincir", "noise", 1.0, "lincir train_phi.py: features += 1.0 * rand * randn"),
    ("transagg", "layers", 2, "ZS-CIR config.py num_layers"),
    ("transagg", "dropout", 0.5, "ZS-CIR config.py dropout"),
    ("transagg", "clip_lr_scale", 0.01, "ZS-CIR get_optimizer: the pretrained model at lr 1e-6 beside 1e-4"),
    ("pli", "mask_ratio", 0.75, "PLI README CLIP commands: --mask_ratio=0.75"),
    ("context-i2w", "middle_dim", 512, "context-i2w params.py --middle_dim"),
    ("context-i2w", "dropout", 0.1, "context-i2w params.py --droprate"),
    ("rtd", "noise", 0.5, "RTD train_text_encoder.py --noise_scale"),
    ("rtd", "tau", 0.07, "RTD train_text_encoder.py --tau"),
]

# (method, trainer default, value, source)
TRAINER_DEFAULTS = [
    ("slerp-tat", "lr", 1e-4, "REFERENCE §2 TAT: AdamW lr 1e-4"),
    ("slerp-tat", "batch_size", 1024, "REFERENCE §2 TAT: batch 1024"),
    ("slerp-tat", "epochs", 1, "REFERENCE §2 TAT: 1 epoch"),
    ("pic2word", "lr", 1e-4, "REFERENCE §2 Pic2Word: lr 1e-4"),
    ("pic2word", "weight_decay", 0.1, "REFERENCE §2 Pic2Word: wd 0.1"),
    ("pic2word", "batch_size", 128, "REFERENCE §2 Pic2Word: batch 128/GPU (one GPU)"),
    ("pic2word", "epochs", 30, "REFERENCE §2 Pic2Word: 30 epochs"),
    ("pic2word", "warmup_steps", 10000, "REFERENCE §2 Pic2Word: 10k warmup"),
    ("pic2word", "schedule", "cosine", "REFERENCE §2 Pic2Word: cosine"),
    ("searle", "lr", 1e-4, "train_phi.py --learning-rate"),
    ("searle", "weight_decay", 0.01, "train_phi.py --weight-decay"),
    ("searle", "batch_size", 256, "train_phi.py --batch-size"),
    ("searle", "epochs", 100, "train_phi.py --num-epochs"),
    ("fti4cir", "lr", 4e-5, "REFERENCE §2 FTI4CIR: AdamW lr 4e-5"),
    ("fti4cir", "weight_decay", 0.01, "REFERENCE §2 FTI4CIR: wd 0.01"),
    ("fti4cir", "batch_size", 256, "REFERENCE §2 FTI4CIR: batch 256"),
    ("fti4cir", "schedule", "step", "REFERENCE §2 FTI4CIR: lr x0.1 after epoch 10"),
    ("fti4cir", "step_epochs", (10,), "REFERENCE §2 FTI4CIR: lr x0.1 after epoch 10"),
    ("fti4cir", "step_gamma", 0.1, "REFERENCE §2 FTI4CIR: lr x0.1 after epoch 10"),
    ("lincir", "lr", 1e-4, "lincir train_phi.py --learning_rate"),
    ("lincir", "weight_decay", 0.01, "lincir train_phi.py --weight_decay"),
    ("lincir", "batch_size", 512, "lincir README: --batch_size 64 on 8 processes"),
    ("lincir", "max_steps", 20000, "lincir README: --max_train_steps 20000"),
    ("lincir", "warmup_steps", 0, "lincir README: constant_with_warmup --lr_warmup_steps 0"),
    ("transagg", "lr", 1e-4, "ZS-CIR config.py learning_rate"),
    ("transagg", "weight_decay", 0.05, "ZS-CIR config.py weight_decay (every group)"),
    ("transagg", "batch_size", 64, "ZS-CIR config.py batch_size"),
    ("transagg", "epochs", 100, "ZS-CIR config.py num_epochs"),
    ("transagg", "schedule", "cosine", "ZS-CIR main.py CosineAnnealingWarmRestarts(T_0=num_epochs)"),
    ("transagg", "min_lr", 1e-6, "ZS-CIR main.py eta_min=1e-2 * learning_rate"),
    ("transagg", "max_grad_norm", 5.0, "ZS-CIR trainer.py clip_grad_norm_(max_norm=5)"),
    ("pli", "lr", 1e-6, "PLI README: --lr=1e-6"),
    ("pli", "weight_decay", 5e-5, "PLI command_line.py --weight_decay"),
    ("pli", "batch_size", 64, "PLI README ViT-L/14 targetpad command: --batch_size=64"),
    ("pli", "epochs", 5, "PLI README ViT-L/14 targetpad command: --epoch=5"),
    ("pli", "warmup_epochs", 5, "PLI command_line.py --warmup_iters (epochs)"),
    ("context-i2w", "lr", 5e-4, "context-i2w params.py get_default_params (ViT)"),
    ("context-i2w", "weight_decay", 0.2, "context-i2w params.py --wd"),
    ("context-i2w", "batch_size", 64, "context-i2w params.py --batch-size (per GPU; one GPU)"),
    ("context-i2w", "epochs", 32, "context-i2w params.py --epochs"),
    ("context-i2w", "warmup_steps", 10000, "context-i2w params.py --warmup"),
    ("context-i2w", "schedule", "cosine", "context-i2w main.py: cosine_lr(optimizer, lr, warmup, total_steps)"),
    ("rtd", "lr", 1e-5, "RTD run.sh --learning_rate 1e-5"),
    ("rtd", "weight_decay", 0.01, "RTD train_text_encoder.py --weight_decay"),
    ("rtd", "batch_size", 512, "RTD run.sh --batch_size 128 on 4 processes"),
    ("rtd", "max_steps", 2000, "RTD run.sh --max_train_steps 2000"),
    ("rtd", "warmup_steps", 0, "RTD run.sh constant_with_warmup --lr_warmup_steps 0"),
]

# (method, preprocessing, source)
PREPROCESSING = [
    ("searle", "targetpad", "REFERENCE §1 Preprocessing: targetpad (SEARLE, FTI4CIR)"),
    ("searle-oti", "targetpad", "oti_inversion.py --preprocess-type targetpad"),
    ("fti4cir", "targetpad", "REFERENCE §1 Preprocessing: targetpad (SEARLE, FTI4CIR)"),
    ("pic2word", "clip", "REFERENCE §1 Preprocessing: clip (Pic2Word, LinCIR)"),
    ("transagg", "targetpad", "ZS-CIR config.py transform targetpad, target_ratio 1.25"),
]


def _option(specs, name):
    (spec,) = [o for o in specs if o.name == name]
    return spec


@pytest.mark.parametrize("method, name, value, source", OPTIONS)
def test_run_options_default_to_the_published_values(method, name, value, source):
    spec = _option(get_registry().method(method).options, name)
    if isinstance(value, dict):
        for dataset, expected in value.items():
            assert spec.default_for(dataset) == pytest.approx(expected), (dataset, source)
    else:
        assert spec.default == pytest.approx(value), source


@pytest.mark.parametrize("method, name, value, source", TRAIN_OPTIONS)
def test_training_options_default_to_the_published_values(method, name, value, source):
    assert _option(get_registry().method(method).train_options, name).default == pytest.approx(value), source


@pytest.mark.parametrize("method, name, value, source", TRAINER_DEFAULTS)
def test_training_runs_default_to_the_published_schedule(method, name, value, source):
    defaults = get_registry().method(method).load_trainer().defaults
    assert defaults[name] == (value if isinstance(value, str | tuple) else pytest.approx(value)), source


@pytest.mark.parametrize("method, kind, source", PREPROCESSING)
def test_methods_default_to_their_official_preprocessing(method, kind, source):
    spec = get_registry().method(method)
    assert spec.default_preprocess == kind, source
    if spec.trainer is not None and method != "searle-oti":
        assert spec.load_trainer().preprocess_kind in (kind, None), source
