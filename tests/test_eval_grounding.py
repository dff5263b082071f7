"""REC box parsing / IoU / Acc@0.5 and RES mask cIoU / gIoU, with values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from jaxvlm.eval import evaluate
from jaxvlm.eval.grounding import box_iou, decode_mask, encode_mask, parse_box, to_pixels


@pytest.mark.parametrize("text, fmt, expected", [
    ("[0.1, 0.2, 0.5, 0.6]", "auto", ("llava", [0.1, 0.2, 0.5, 0.6])),
    ("The region is [0.081, 0.2, 0.92, 0.84].", "llava", ("llava", [0.081, 0.2, 0.92, 0.84])),
    ("<box>(99,199),(499,599)</box>", "auto", ("qwen_vl", [99, 199, 499, 599])),
    ("<ref>the man</ref><box>(0,0),(999,999)</box>", "qwen_vl", ("qwen_vl", [0, 0, 999, 999])),
    ("(99,199),(499,599)</box>", "auto", ("qwen_vl", [99, 199, 499, 599])),   # continuation of "...<box>"
    ('{"bbox_2d": [12, 30, 200, 310], "label": "cat"}', "auto", ("qwen25_vl", [12, 30, 200, 310])),
    ('```json\n[\n  {"bbox_2d": [5, 6, 70, 80], "label": "dog"}\n]\n```', "qwen25_vl", ("qwen25_vl", [5, 6, 70, 80])),
    ('```json\n[{"bbox_2d": [5, 6, 70, 80], "label": "do', "auto", ("qwen25_vl", [5, 6, 70, 80])),  # truncated
    ("[12, 30, 200, 310]", "auto", ("qwen25_vl", [12, 30, 200, 310])),     # > 1: pixels
    ("I cannot find it.", "auto", None),
    ("<box>(1,2)</box>", "qwen_vl", None),
])
def test_parse_box(text, fmt, expected):
    got = parse_box(text, fmt)
    if expected is None:
        assert got is None
    else:
        assert got[0] == expected[0] and got[1] == pytest.approx(expected[1])


def test_to_pixels():
    # Qwen-VL: v / 999 * size
    assert to_pixels("qwen_vl", [0, 0, 999, 499.5], 200, 100) == pytest.approx([0, 0, 200, 50])
    # LLaVA padded square: 200 x 100 image pads to 200 x 200 with 50 px on top.
    assert to_pixels("llava", [0.25, 0.25, 0.75, 0.75], 200, 100) == pytest.approx([50, 0, 150, 100])
    assert to_pixels("llava", [0.25, 0.25, 0.75, 0.75], 200, 100, square_pad=False) == pytest.approx([50, 25, 150, 75])
    # Qwen2.5-VL saw a 400 x 200 resize of a 200 x 100 image.
    assert to_pixels("qwen25_vl", [40, 20, 400, 200], 200, 100, input_size=(400, 200)) == pytest.approx([20, 10, 200, 100])


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # inverted box has no area


def test_rec_acc_at_05():
    anns = [
        {"question_id": "a", "bbox": [0, 0, 100, 100], "width": 200, "height": 200},
        {"question_id": "b", "bbox": [0, 0, 100, 100], "width": 200, "height": 200},
        {"question_id": "c", "bbox": [10, 20, 50, 40], "width": 200, "height": 100},   # xyxy
        {"question_id": "d", "bbox": [0, 0, 10, 10], "width": 200, "height": 200},
    ]
    preds = [
        # exact box on the 0-999 grid: 100/200*999 = 499.5 -> writing 499.5 keeps it exact
        {"question_id": "a", "text": "<ref>it</ref><box>(0,0),(499.5,499.5)</box>"},
        # half overlap: [50,0,150,100] vs [0,0,100,100] -> 50*100 / (2*10000 - 5000) = 1/3
        {"question_id": "b", "text": "[0.25, 0.0, 0.75, 0.5]"},
        # Qwen2.5-VL pixels, identical box
        {"question_id": "c", "text": '```json\n[{"bbox_2d": [10, 20, 50, 40], "label": "x"}]\n```'},
        {"question_id": "d", "text": "no box here"},
    ]
    r = evaluate("rec", preds, anns, per_sample=True)
    ious = [x["iou"] for x in r["per_sample"]]
    assert ious == pytest.approx([1.0, 1 / 3, 1.0, 0.0])
    assert r["scores"]["acc@0.5"] == 0.5
    assert r["scores"]["mean_iou"] == pytest.approx((2 + 1 / 3) / 4)
    assert r["scores"]["parse_failures"] == 0.25


def test_rec_xywh_ground_truth():
    anns = [{"question_id": 1, "bbox": [10, 20, 40, 20], "width": 100, "height": 100}]
    r = evaluate("rec", [{"question_id": 1, "text": '{"bbox_2d": [10, 20, 50, 40]}'}], anns, gt_format="xywh")
    assert r["scores"]["acc@0.5"] == 1.0


def test_mask_rle_roundtrip_needs_no_fortran_order_from_caller():
    m = np.zeros((5, 7), dtype=np.uint8)  # C-ordered, as numpy makes it
    m[1:4, 2:6] = 1
    rle = encode_mask(m)
    assert isinstance(rle["counts"], str)
    assert (decode_mask(rle) == m.astype(bool)).all()


def test_res_ciou_giou_by_hand():
    h, w = 10, 10
    gt1 = np.zeros((h, w), bool); gt1[0:4, 0:5] = True       # 20 px
    pr1 = np.zeros((h, w), bool); pr1[0:4, 0:10] = True      # 40 px, I = 20, U = 40
    gt2 = np.zeros((h, w), bool); gt2[5:10, 5:10] = True     # 25 px
    pr2 = np.zeros((h, w), bool); pr2[5:10, 5:10] = True     # I = 25, U = 25
    gt3 = np.zeros((h, w), bool); gt3[0:2, 0:2] = True       # 4 px, prediction missing: I = 0, U = 4
    anns = [{"question_id": 1, "segmentation": encode_mask(gt1)},
            {"question_id": 2, "segmentation": encode_mask(gt2)},
            # polygon ground truth: square (0,0)-(2,2) rasterises to the 2x2 block
            {"question_id": 3, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]], "height": h, "width": w}]
    assert (decode_mask(anns[2]["segmentation"], h, w) == gt3).all()
    preds = [{"question_id": 1, "mask": encode_mask(pr1)}, {"question_id": 2, "mask": encode_mask(pr2)},
             {"question_id": 3}]
    s = evaluate("res", preds, anns)["scores"]
    assert s["cIoU"] == pytest.approx((20 + 25 + 0) / (40 + 25 + 4))
    assert s["gIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert s["acc@0.5"] == pytest.approx(2 / 3)
