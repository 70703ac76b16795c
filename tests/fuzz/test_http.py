"""The fuzz over every HTTP route that takes input: native /api, A1111 /sdapi/v1, OpenAI /v1."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    A1111_CORE,
    EDIT_OPTIONAL,
    IMG2IMG_CORE,
    IMG2IMG_OPTIONAL,
    MODEL_NAMES,
    NATIVE_CORE,
    NATIVE_OPTIONAL,
    OPENAI_CORE,
    OPENAI_OPTIONAL,
    OVERRIDES,
    TXT2IMG_OPTIONAL,
    any_body,
    anything,
    axes,
    base64_images,
    bodies,
    encode,
    info_images,
    models_,
    mostly,
    some_images,
    texts,
    url_texts,
    with_wrong,
)
from tests.fuzz.support import (
    check,
    follow_job,
    fuzz,
    post_json,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),  # Pillow, reading the fuzz's images
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),  # hypothesis, printing 70k-character examples
]


# --- HTTP: the native /api ----------------------------------------------------------------------------------


@fuzz(90)
@given(body=any_body(bodies(NATIVE_CORE, NATIVE_OPTIONAL)))
def test_native_jobs(served, body):
    served.begin()
    try:
        r = check(post_json(served, "/api/jobs", body))
        follow_job(served, r)
    finally:
        served.settle()


@fuzz(60)
@given(xy=st.fixed_dictionaries({}, optional={"x": axes, "y": axes}), body=st.fixed_dictionaries(
    {"prompt": st.sampled_from(("a cat", "a red fox in the snow"))},
    optional={"seed": st.integers(-1, 3), "negative_prompt": st.just("cat")}))
# numbers the axis parser could not handle: each was a 500 (ValueError or OverflowError from int()/float())
@example(xy={"x": "steps=1-" + "9" * 5000}, body={"prompt": "a cat"})  # int() refuses 4,300 digits and more
@example(xy={"x": "cfg=0-1" + "0" * 400}, body={"prompt": "a cat"})  # a float bound that is infinite
@example(xy={"x": "steps=1-" + "9" * 400 + " (+1)"}, body={"prompt": "a cat"})  # a range too long for a float
@example(xy={"y": "size=64x" + "9" * 5000}, body={"prompt": "a cat"})
@example(xy={"x": "steps=1-3 [" + "9" * 5000 + "]"}, body={"prompt": "a cat"})
def test_native_xy_plots(served, xy, body):
    served.begin()
    try:
        r = check(post_json(served, "/api/jobs", {**body, "steps": 1, "width": 64, "height": 64, "sampler": "Euler",
                                                  "xy": xy}))
        follow_job(served, r)
    finally:
        served.settle()


path_text = st.one_of(url_texts, st.sampled_from(("0", "1", "-1", "2", str(2**63), str(2**64), "1e3", "%00", "..", "")))


def quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@fuzz(150)
@given(case=st.one_of(
    st.tuples(st.just("POST"), st.just("/api/models/select"), any_body(st.fixed_dictionaries({"model": models_}))),
    st.tuples(st.just("GET"), st.just("/api/history"),
              st.fixed_dictionaries({}, optional={"q": url_texts, "page": with_wrong(st.integers(1, 3)),
                                                  "per_page": with_wrong(st.sampled_from((1, 24, 500, 501, 0)))})),
    st.tuples(st.sampled_from(("GET", "DELETE")), st.sampled_from(("/api/images/{}", "/api/history/{}")), path_text),
    st.tuples(st.sampled_from(("GET", "POST")),
              st.sampled_from(("/api/jobs/{}", "/api/jobs/{}/interrupt", "/api/jobs/{}/preview", "/api/jobs/{}/grid",
                               "/api/jobs/{}/images/0", "/api/models/{}/preview")), path_text),
))
def test_native_routes(served, case):
    method, url, arg = case
    served.begin()
    try:
        if url == "/api/models/select":
            r = post_json(served, url, arg)
        elif url == "/api/history":
            params = {k: str(v)[:4000].encode("utf-8", "surrogatepass") for k, v in arg.items()}
            r = served.request(method, url + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items()))
        else:
            r = served.request(method, url.format(quoted(str(arg))))
        check(r)
    finally:
        served.settle()
        served.studio.settings.update(current_model=None)


multipart_files = st.lists(
    st.tuples(st.sampled_from(("file", "image", "image[]", "mask", "other")),
              st.one_of(st.sampled_from(("a.png", "", "../x.png", "\u202e.png")), texts),
              info_images, st.sampled_from(("image/png", "application/octet-stream", "text/plain", ""))),
    max_size=3)


@fuzz(120)
@given(files=st.one_of(st.tuples(st.just("file"), st.sampled_from(("a.png", "b.jpg")), info_images,
                                 st.just("image/png")).map(lambda part: [part]), multipart_files),
       fields=st.dictionaries(st.sampled_from(("file", "x")), texts, max_size=1))
def test_native_png_info(served, files, fields):
    r = served.request("POST", "/api/png-info", files=_files(files), data=_fields(fields))
    check(r)


def _files(files) -> list:
    return [(part, (name.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), data, kind or None))
            for part, name, data, kind in files]


def _fields(fields: dict) -> dict:
    """Form fields as bytes (lone surrogates sent as the invalid UTF-8 a client would send); httpx encodes
    the names itself, so a surrogate in a name becomes "?"."""
    return {k.encode("utf-8", "replace").decode("utf-8"): str(v).encode("utf-8", "surrogatepass")
            for k, v in fields.items()}


# --- HTTP: the A1111 API ---------------------------------------------------------------------------------------


@fuzz(90)
@given(case=st.one_of(
    st.tuples(st.just("/sdapi/v1/txt2img"), any_body(bodies(A1111_CORE, TXT2IMG_OPTIONAL))),
    st.tuples(st.just("/sdapi/v1/img2img"), any_body(bodies(IMG2IMG_CORE, IMG2IMG_OPTIONAL))),
))
def test_a1111_generation(served, case):
    url, body = case
    served.begin()
    try:
        r = check(post_json(served, url, body))
        if r.status_code == 200:
            answer = r.json()
            assert isinstance(answer["images"], list) and isinstance(json.loads(answer["info"]), dict)
    finally:
        served.settle()


@fuzz(150)
@given(case=st.one_of(
    st.tuples(st.just("POST"), st.just("/sdapi/v1/options"), st.one_of(OVERRIDES, anything)),
    st.tuples(st.just("POST"), st.just("/sdapi/v1/png-info"),
              any_body(st.fixed_dictionaries({"image": with_wrong(base64_images(info_images))}))),
    st.tuples(st.just("GET"), st.just("/sdapi/v1/progress"), st.one_of(url_texts, st.booleans())),
    st.tuples(st.just("POST"), st.sampled_from(("/sdapi/v1/interrupt", "/sdapi/v1/skip")), anything),
))
def test_a1111_routes(served, case):
    method, url, arg = case
    served.begin()
    try:
        if method == "GET":
            value = quoted(str(arg))
            r = served.request("GET", f"{url}?skip_current_image={value}")
        else:
            r = post_json(served, url, arg)
        check(r)
    finally:
        served.settle()
        served.studio.settings.update(current_model=None, clip_skip=1, vae=None, max_side=4096, max_batch_size=16,
                                      max_batch_count=100, max_steps=500)


# --- HTTP: the OpenAI API ------------------------------------------------------------------------------------


@fuzz(60)
@given(body=any_body(bodies(OPENAI_CORE, OPENAI_OPTIONAL)))
def test_openai_generations(served, body):
    served.begin()
    try:
        r = check(post_json(served, "/v1/images/generations", body), openai=True)
        if r.status_code == 200:
            assert isinstance(r.json()["data"], list)
    finally:
        served.settle()


edit_fields = bodies(OPENAI_CORE, EDIT_OPTIONAL).map(lambda d: {k: v if isinstance(v, str) else json.dumps(
    v, allow_nan=True) for k, v in d.items()})


edit_files = mostly(
    st.tuples(st.sampled_from(("image", "image[]")), st.just("a.png"), some_images, st.just("image/png")).flatmap(
        lambda image: st.lists(st.tuples(st.just("mask"), st.just("m.png"), some_images, st.just("image/png")),
                               max_size=1).map(lambda masks: [image, *masks])), multipart_files, 4)


@fuzz(60)
@given(files=edit_files, fields=edit_fields)
def test_openai_edits(served, files, fields):
    served.begin()
    try:
        r = served.request("POST", "/v1/images/edits", files=_files(files), data=_fields(fields))
        r = check(r, openai=True)
        if r.status_code == 200:
            assert isinstance(r.json()["data"], list)
    finally:
        served.settle()


@fuzz(60)
@given(model_id=st.one_of(st.sampled_from(MODEL_NAMES), url_texts))
def test_openai_models(served, model_id):
    if not quoted(model_id):
        return
    check(served.request("GET", f"/v1/models/{quoted(model_id)}"), openai=True)


# --- HTTP: bodies that are not what a route reads ----------------------------------------------------------------

POST_ROUTES = ("/api/jobs", "/api/models/select", "/api/png-info", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
               "/sdapi/v1/options", "/sdapi/v1/png-info", "/sdapi/v1/interrupt", "/sdapi/v1/skip",
               "/v1/images/generations", "/v1/images/edits")
CONTENT_TYPES = ("application/json", "application/json; charset=latin-1", "text/plain", "multipart/form-data",
                 "multipart/form-data; boundary=xyz", "multipart/form-data; boundary=",
                 "application/x-www-form-urlencoded",
                 "application/octet-stream", "image/png", "", "application/json; charset=utf-16", "*/*")
raw_bodies = st.one_of(
    st.binary(max_size=200), texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    anything.map(encode).map(lambda b: b[: len(b) // 2]),  # truncated JSON
    st.sampled_from((b"", b"null", b"[]", b'"x"', b"1e999", b"NaN", b"{" * 5000 + b"}" * 5000, b"[" * 100_000,
                     b'{"prompt": "x", "prompt": 1}', b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b'{"a": 1' * 3,
                     b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\x89PNG",
                     b"--xyz--\r\n", b"a=1&b=%ff&prompt=%ED%A0%80", b"9" * 5000)),
)


@fuzz(150)
@given(url=st.sampled_from(POST_ROUTES), content=raw_bodies, content_type=st.sampled_from(CONTENT_TYPES))
@example(url="/v1/images/generations", content=b"\x80", content_type="application/json")  # was a 500
@example(url="/api/jobs", content=b"\x80", content_type="application/json")
def test_bodies_that_are_not_what_a_route_reads(served, url, content, content_type):
    served.begin()
    try:
        headers = {"content-type": content_type} if content_type else {}
        check(served.request("POST", url, content=content, headers=headers), openai=url.startswith("/v1"))
    finally:
        served.settle()
