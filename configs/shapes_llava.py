"""The embedded default's recipe: a ~1.9M-parameter LLaVA (CLIP-style ViT + mlp2x_gelu projector +
Llama LM) learning the synthetic shapes world from scratch on a 2-core CPU.

    jaxvlm train --config configs/shapes_llava.py \
        --set data.path=out/demo/world/llava/train.json --set data.image_root=out/demo/world/images \
        --set data.tokenizer=out/demo/tokenizer --set train.export=out/demo/checkpoint

`jaxvlm demo` generates the world and tokenizer, sets these paths and runs stage 0 (VISION_PRETRAIN)
first; `jaxvlm train` alone needs `--set model.vision_init=FILE` (a `dense_vision` tower), else it trains
with the tower frozen at its random init (it warns).
"""
from jaxvlm.train.config import train_defaults

VOCAB = 1024           # >= the shapes tokenizer's size (jaxvlm.data.shapes_tokenizer.DEFAULT_VOCAB_SIZE)
IMAGE_TOKEN_ID = 4     # "<image>" in the shapes tokenizer (checked by the demo)


#: Stage 0 (`--vision-steps 0` skips it): dense per-patch pretraining of the vision tower on masks
#: (jaxvlm.train.dense_vision), a stand-in for a pretrained CLIP, on a world of its own (12000 images,
#: the next seed; generated in ~45 s) with object patches' cross-entropy weighted 5x background's;
#: 3000 steps, ~3 min here (4000 reach 0.76-0.82 but cost the LM steps grounding needs). Held-out per-patch
#: category accuracy 0.74 (chance ~0.08), colour 0.98, box error 2.7% of the side; 1000 steps on the LM's 3000
#: train images reached 0.47 (a plateau:
#: 2500 steps 0.49). Against that older stage 0, in the full recipe: CHAIR-i 0.156 vs
#: 0.339, caption recall 0.46 vs 0.28, VQA 0.422 vs 0.403, METEOR 0.172 vs 0.139 (README).
#: `box_bins=28` (boxes classified, not regressed) speeds grounding-only REC ~3x but costs the full
#: recipe most of its captioning and VQA (CHAIR-i 0.502); left off (docs/shapes_world_recipe.md). With `box_weight=0.25`
#: category holds (0.79) but the full recipe is still worse (CHAIR-i 0.292, REC unchanged).
VISION_PRETRAIN = dict(steps=3000, batch=32, lr=3e-3, warmup=100, object_weight=5.0, images=12000)


def get_config():
    cfg = train_defaults()
    cfg.model.update(
        # MLP 256, not 512: 4200 LM steps ~1.4x faster, and grounding needs LM steps, not MLP width
        # (docs/shapes_world_recipe.md, session 28).
        text=dict(vocab_size=VOCAB, hidden_size=192, intermediate_size=256, num_layers=4, num_heads=6,
                  num_kv_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                  scan_layers=False),     # 4 unrolled layers: steps ~18% faster on CPU than scanned
        vision=dict(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, image_size=112,
                    patch_size=16),
        image_token_id=IMAGE_TOKEN_ID,
        number_init=True)       # box-coordinate tokens start as a Fourier code of their value: REC needs it
    # 4200 steps: REC (the object lookup) forms only after ~4000 steps of the mix (1400 left it at the centre
    # box's level). Batch 8, not 16: the same compute, but twice the optimizer steps, and learning to read
    # the image is a plateau measured in steps (a colour probe escapes it ~2x sooner per FLOP at batch 8;
    # batch 4 is too noisy).  seq_len 192 fits every record (box coordinates are one token each, see
    # jaxvlm.data.shapes_tokenizer); lr 3e-4 >> 1e-3 here.
    cfg.data.update(kind="pipeline", template="vicuna_v1", batch_size=8, seq_len=192, images_per_sample=1, seed=0)
    # The stage-0 tower stays frozen, as LLaVA keeps CLIP frozen: against training it along, CHAIR-i
    # 0.339 vs 0.417, VQA 0.403 vs 0.383, "What colour is the X?" 0.44 vs 0.17 (README).
    # (`jaxvlm demo --vision-steps 0` drops the freeze: a random tower is trained, not frozen.)
    cfg.optim.update(groups=[dict(name="vision_tower", pattern=r"vision_tower/.*", lr=None)], default_lr=3e-4,
                     schedule="warmup_cosine", warmup_steps=100, weight_decay=0.01, clip_norm=1.0,
                     end_lr_ratio=0.05)
    cfg.train.update(steps=4200, log_every=50, workdir="out/demo/train")
    cfg.checkpoint.update(every=500, keep=1)
    return cfg
