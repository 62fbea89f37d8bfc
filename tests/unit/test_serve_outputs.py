"""Accept negotiation and response bodies: the original's raw logits, top-k, JSON lines."""
import json

import numpy as np
import pytest

from kennel_serve.mms_toolkit.errors import RequestError
from kennel_serve.outputs import (JSON_ANSWER_TYPE, JSONLINES_ANSWER_TYPE, TOPK_ANSWER_TYPE, Prediction,
                                  custom_attributes, negotiate, render)

NAMES = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]
PREDICTION = Prediction(logits=np.array([[0.5, 2.0, -1.0], [3.0, 0.0, 0.1]], dtype=np.float32), class_names=NAMES)


@pytest.mark.parametrize("accept, chosen", [
    (None, JSON_ANSWER_TYPE),
    ("", JSON_ANSWER_TYPE),
    ("*/*", JSON_ANSWER_TYPE),
    ("application/json", JSON_ANSWER_TYPE),
    ("application/json; charset=utf-8", JSON_ANSWER_TYPE),
    ("text/html, application/*;q=0.5", JSON_ANSWER_TYPE),
    (TOPK_ANSWER_TYPE, TOPK_ANSWER_TYPE),
    ("application/json;q=0.4, application/vnd.kennel.topk+json", TOPK_ANSWER_TYPE),
    ("application/x-jsonlines", JSONLINES_ANSWER_TYPE),
    ("application/jsonlines;q=0, application/json", JSON_ANSWER_TYPE),
])
def test_negotiation_honours_preferences(accept, chosen):
    assert negotiate(accept) == chosen


@pytest.mark.parametrize("accept", ["text/html", "image/png, text/csv", "application/json;q=0"])
def test_nothing_acceptable_is_406(accept):
    with pytest.raises(RequestError) as caught:
        negotiate(accept)
    assert caught.value.status_code == 406
    assert "application/json" in caught.value.message


def test_default_json_is_the_original_answer():
    body, content_type = render(PREDICTION, JSON_ANSWER_TYPE, {}, default_k=5)
    assert content_type == JSON_ANSWER_TYPE
    np.testing.assert_allclose(json.loads(body), [[0.5, 2.0, -1.0], [3.0, 0.0, 0.1]], atol=1e-6)


def test_top_k_by_accept_and_by_custom_attribute():
    body, content_type = render(PREDICTION, TOPK_ANSWER_TYPE, {}, default_k=2)
    first, second = json.loads(body)
    assert content_type == TOPK_ANSWER_TYPE
    assert [entry["class_name"] for entry in first] == ["002.Afghan_hound", "001.Affenpinscher"]
    assert first[0]["breed"] == "Afghan hound" and first[0]["index"] == 1
    probabilities = np.exp([0.5, 2.0, -1.0]) / np.exp([0.5, 2.0, -1.0]).sum()
    assert first[0]["probability"] == pytest.approx(probabilities[1], rel=1e-6)
    assert second[0]["class_name"] == "001.Affenpinscher"
    # top_k from the custom attributes wins, also under plain application/json.
    body, content_type = render(PREDICTION, JSON_ANSWER_TYPE, {"top_k": "3"}, default_k=2)
    assert content_type == JSON_ANSWER_TYPE and [len(rows) for rows in json.loads(body)] == [3, 3]


def test_json_lines_one_answer_per_image():
    body, content_type = render(PREDICTION, JSONLINES_ANSWER_TYPE, {}, default_k=5)
    lines = body.splitlines()
    assert content_type == JSONLINES_ANSWER_TYPE and len(lines) == 2 and body.endswith("\n")
    np.testing.assert_allclose(json.loads(lines[1]), [[3.0, 0.0, 0.1]], atol=1e-6)


def test_custom_attributes_header_parsing():
    headers = {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "trace=abc; top_k=7,flag"}
    assert custom_attributes(headers) == {"trace": "abc", "top_k": "7"}
    assert custom_attributes({"x-amzn-sagemaker-custom-attributes": b"top_k=1"}) == {"top_k": "1"}
    assert custom_attributes(None) == {}


@pytest.mark.parametrize("value", ["0", "-1", "five", "2.5"])
def test_bad_top_k_is_400(value):
    with pytest.raises(RequestError) as caught:
        render(PREDICTION, JSON_ANSWER_TYPE, {"top_k": value}, default_k=5)
    assert caught.value.status_code == 400 and "top_k" in caught.value.message


@pytest.mark.parametrize("value", ["\u00b2", "\u2460", "\u0663", "9" * 5000, "0", "-1", "1.5", ""])
def test_a_top_k_that_is_not_a_small_ascii_number_is_a_400(value):
    with pytest.raises(RequestError) as caught:
        render(PREDICTION, JSON_ANSWER_TYPE, {"top_k": value}, default_k=2)
    assert caught.value.status_code == 400 and len(caught.value.message) < 120
