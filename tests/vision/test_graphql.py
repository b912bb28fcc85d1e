"""Image analysis end to end: a live server with its inference pool (the packaged models in a
worker process), uploads over the GraphQL multipart spec, results streamed per task."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from skimage import data
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from backend.config import BudgetSpec, CostSettings, GuardrailSettings, Settings, VisionSettings
from tests.agents.test_runs import gql, sign_in
from tests.conftest import VISION_TIMEOUTS, LiveServer, scaled, serve_live
from tests.graphql.ws import results

ANALYZE = """mutation($image: Upload!, $tasks: [VisionTask!]!, $classifier: String,
    $detector: String, $minScore: Float, $maxDetections: Int, $ocrEngine: String) {
  analyzeImage(image: $image, tasks: $tasks, classifier: $classifier, detector: $detector,
    minScore: $minScore, maxDetections: $maxDetections, ocrEngine: $ocrEngine) {
    id status tasks mediaType width height } }"""

EVENTS = """subscription($id: ID!) { visionJobEvents(id: $id) {
  __typename cursor
  ... on VisionTaskCompleted { task model version ms result }
  ... on VisionTaskFailed { task code message }
  ... on VisionJobCompleted { failedTasks }
  ... on VisionJobFailed { code message } } }"""


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def text_image() -> bytes:
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 30)
    page = Image.new("RGB", (720, 180), "white")
    draw = ImageDraw.Draw(page)
    draw.text((24, 30), "Invoice 4711 is due on Friday", font=font, fill="black")
    draw.text((24, 100), "Total: 129.50 EUR", font=font, fill="black")
    return jpeg(np.asarray(page.rotate(3, expand=True, fillcolor="white")))


async def upload(
    server: LiveServer, token: str, image: bytes, tasks: list[str], **variables: Any
) -> dict[str, Any]:
    operations = {
        "query": ANALYZE,
        "variables": {"image": None, "tasks": tasks, **variables},
    }
    async with httpx.AsyncClient(base_url=server.http_url, timeout=scaled(30)) as http:
        response = await http.post(
            "/graphql",
            data={
                "operations": json.dumps(operations),
                "map": json.dumps({"0": ["variables.image"]}),
            },
            files={"0": ("photo.bin", image, "application/octet-stream")},
            headers={"authorization": f"Bearer {token}"},
        )
    return response.json()


async def analyse(
    server: LiveServer, token: str, image: bytes, tasks: list[str], **variables: Any
) -> list[dict]:
    sent = await upload(server, token, image, tasks, **variables)
    assert "errors" not in sent, sent
    job = sent["data"]["analyzeImage"]["id"]
    return await results(server.ws_url, token, EVENTS, {"id": job}, "visionJobEvents", timeout=90)


def vision_on(settings: Settings, **options: Any) -> Settings:
    settings.vision = VisionSettings(enabled=True, **{**VISION_TIMEOUTS, **options})
    return settings


async def test_classify_detect_and_read_an_image(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    async with serve_live(vision_on(chat_settings)) as server:
        token = await sign_in(server, account)

        cat = await analyse(server, token, jpeg(data.chelsea()), ["CLASSIFY", "DETECT"])
        kinds = [e["__typename"] for e in cat]
        assert kinds[0] == "VisionJobQueued"
        assert sorted(kinds[1:3]) == ["VisionTaskCompleted", "VisionTaskCompleted"]
        assert kinds[-1] == "VisionJobCompleted"
        by_task = {e["task"]: e for e in cat if e["__typename"] == "VisionTaskCompleted"}
        classes = [c["label"] for c in by_task["classify"]["result"]["classes"]]
        assert classes[0] in {"tabby", "Egyptian cat", "tiger cat"}  # top-1 on a clear photo
        assert by_task["classify"]["model"] == "efficientnet-lite0"
        assert by_task["detect"]["model"] == "ssd-mobilenet-v2-coco"  # the default detector
        cats = [o for o in by_task["detect"]["result"]["objects"] if o["label"] == "cat"]
        assert cats
        assert cats[0]["score"] >= 0.5

        person = await analyse(
            server, token, jpeg(data.astronaut()), ["DETECT"], detector="haar-frontalface"
        )
        [detected] = [e for e in person if e["__typename"] == "VisionTaskCompleted"]
        faces = detected["result"]["objects"]
        assert faces
        assert faces[0]["label"] == "face"
        assert 0.5 < faces[0]["score"] <= 1
        box = faces[0]["box"]
        assert 150 < box["x"] + box["width"] / 2 < 300  # her face, in the upper middle
        assert box["y"] < 200

        cup = await analyse(
            server, token, jpeg(data.coffee()), ["DETECT"], minScore=0.6, maxDetections=1
        )
        [detected] = [e for e in cup if e["__typename"] == "VisionTaskCompleted"]
        assert [o["label"] for o in detected["result"]["objects"]] == ["cup"]
        refused = await upload(server, token, jpeg(data.coffee()), ["DETECT"], detector="yolo")
        [error] = refused["errors"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT"
        assert "ssd-mobilenet-v2-coco" in error["message"]
        assert "haar-frontalface" in error["message"]

        page = await analyse(server, token, text_image(), ["OCR"])
        [read] = [e for e in page if e["__typename"] == "VisionTaskCompleted"]
        assert "Invoice 4711" in read["result"]["text"]
        assert "129.50" in read["result"]["text"]
        assert read["model"] == "tesseract"
        assert {"text", "confidence", "box"} <= set(read["result"]["words"][0])

        # the second engine, chosen per request: RapidOCR in the inference pool's worker
        page = await analyse(server, token, text_image(), ["OCR"], ocrEngine="rapidocr")
        [read] = [e for e in page if e["__typename"] == "VisionTaskCompleted"]
        assert (read["model"], read["version"]) == ("rapidocr", "3.10.0")
        assert "Invoice 4711 is due on Friday" in read["result"]["text"]
        assert "Total: 129.50 EUR" in read["result"]["text"]
        assert "Invoice" in [w["text"] for w in read["result"]["words"]]
        assert {"text", "confidence", "box"} <= set(read["result"]["lines"][0])
        refused = await upload(server, token, text_image(), ["OCR"], ocrEngine="easyocr")
        [error] = refused["errors"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT"
        assert error["extensions"]["field"] == "ocrEngine"
        assert "tesseract, rapidocr" in error["message"]

        job_id = (await upload(server, token, jpeg(data.coffee()), ["CLASSIFY"]))["data"][
            "analyzeImage"
        ]["id"]
        await results(server.ws_url, token, EVENTS, {"id": job_id}, "visionJobEvents", timeout=90)
        stored = await gql(
            server,
            token,
            "query($id: ID!) { visionJob(id: $id) { status mediaType width results } }",
            id=job_id,
        )
        job = stored["data"]["visionJob"]
        assert job["status"] == "COMPLETED"
        assert job["mediaType"] == "image/jpeg"
        assert job["results"]["classify"]["version"] == "0.1.0"

        # odd but valid images get a clean result: a 1x1 pixel, a CMYK TIFF
        tiny = io.BytesIO()
        Image.new("RGB", (1, 1), "white").save(tiny, "PNG")
        dot = await analyse(server, token, tiny.getvalue(), ["CLASSIFY", "DETECT", "OCR"])
        assert dot[-1]["__typename"] == "VisionJobCompleted"
        cmyk = io.BytesIO()
        Image.fromarray(data.coffee()).convert("CMYK").save(cmyk, "TIFF")
        coffee = await analyse(server, token, cmyk.getvalue(), ["CLASSIFY"])
        assert coffee[-1]["__typename"] == "VisionJobCompleted"

        usage = await gql(server, token, "{ usage(scope: ME) { resource amount } }")
        compute = [u for u in usage["data"]["usage"] if u["resource"] == "compute_seconds"]
        assert compute
        assert compute[0]["amount"] > 0  # each job charged what its tasks took

        served = await gql(server, token, "{ visionModels { name status batches } }")
        names = {m["name"]: m for m in served["data"]["visionModels"]}
        assert names["efficientnet-lite0"]["status"] == "ready"
        assert names["efficientnet-lite0"]["batches"] >= 3
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            metrics = (await http.get("/metrics")).text
        batches = 'sightline_inference_batch_size_count{model="efficientnet-lite0",version="0.1.0"}'
        assert batches in metrics
        assert "sightline_inference_queue_wait_seconds_bucket" in metrics


async def test_bad_images_and_models_are_refused_with_typed_errors(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    # every image is "unsafe" for this server's image rail
    chat_settings.guardrails = GuardrailSettings(policy={"image": {"threshold": 0.0}})
    async with serve_live(vision_on(chat_settings)) as server:
        token = await sign_in(server, account)
        lying = await upload(server, token, b"%PDF-1.7 not an image", ["CLASSIFY"])
        assert lying["errors"][0]["extensions"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
        svg = await upload(server, token, b'<svg xmlns="http://www.w3.org/2000/svg"/>', ["OCR"])
        assert svg["errors"][0]["extensions"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
        photo = jpeg(data.coffee())
        cut = await upload(server, token, photo[: len(photo) // 2], ["CLASSIFY"])
        assert cut["errors"][0]["extensions"]["code"] == "UNREADABLE_IMAGE"
        empty = await upload(server, token, b"", ["CLASSIFY"])
        assert empty["errors"][0]["extensions"]["code"] == "UNREADABLE_IMAGE"
        unknown = await upload(
            server, token, jpeg(data.coffee()), ["CLASSIFY"], classifier="resnet-9000"
        )
        assert unknown["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        assert unknown["errors"][0]["extensions"]["field"] == "classifier"
        blocked = await upload(server, token, jpeg(data.coffee()), ["CLASSIFY"])
        assert blocked["errors"][0]["extensions"]["code"] == "IMAGE_BLOCKED"
        none = await upload(server, token, jpeg(data.coffee()), [])
        assert none["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

        # One file in two operations of a batch (the multipart spec allows it): the second
        # read the file empty ("UNREADABLE_IMAGE: the image is empty").
        twice = await upload_batch(server, token, jpeg(data.coffee()), 2)
        codes = [r["errors"][0]["extensions"]["code"] for r in twice]
        assert codes == ["IMAGE_BLOCKED", "IMAGE_BLOCKED"], twice


async def upload_batch(server: LiveServer, token: str, image: bytes, times: int) -> list[dict]:
    """One file, mapped to `times` operations of one batched request."""
    operations = [
        {"query": ANALYZE, "variables": {"image": None, "tasks": ["CLASSIFY"]}}
        for _ in range(times)
    ]
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post(
            "/graphql",
            data={
                "operations": json.dumps(operations),
                "map": json.dumps({"0": [f"{i}.variables.image" for i in range(times)]}),
            },
            files={"0": ("photo.jpg", image, "image/jpeg")},
            headers={"authorization": f"Bearer {token}"},
        )
    return response.json()  # type: ignore[no-any-return]


FEATURES = "{ serverInfo { features { name enabled } } }"


async def features(server: LiveServer, token: str) -> dict[str, bool]:
    listed = (await gql(server, token, FEATURES))["data"]["serverInfo"]["features"]
    return {f["name"]: f["enabled"] for f in listed}


async def test_live_camera_frames_over_a_websocket(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    frame = jpeg(data.astronaut()[::2, ::2].copy())  # 256 x 256
    # no rate limit here (tests/realtime/test_frames.py has it): only "latest wins" drops
    async with serve_live(vision_on(chat_settings, live_max_fps=10_000)) as server:
        token = await sign_in(server, account)
        url = server.ws_url.replace("/graphql", "/ws/vision/live?tasks=detect,classify")
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for _ in range(12):  # a burst, faster than the pool serves
                await ws.send(frame)
            results = []
            while len(results) < 1 or results[-1]["frame"] < 12:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert message["type"] == "result", message
                if message["type"] == "result":
                    results.append(message)
            await ws.send(json.dumps({"type": "stop"}))
            closed = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert {o["label"] for o in results[-1]["detections"]["objects"]} >= {"person"}
        assert results[-1]["classification"]["classes"]
        assert closed["type"] == "closed"
        assert closed["served"] + closed["dropped"] == 12
        assert closed["served"] < 12  # frames that came too fast were dropped, not queued

        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": "not-a-token"}))
            with pytest.raises(ConnectionClosed) as refused:
                await ws.recv()
        assert refused.value.rcvd is not None
        assert refused.value.rcvd.code == 4403

        # What runs is what serverInfo says (it said "vision: not yet built").
        on = await features(server, await sign_in(server, account))
        assert on["vision"] is True
        assert on["knowledge.images"] is True  # images and scans are read by OCR
        assert on["vision.ocr"] is True  # tessdata is installed (OCR is tested above)


async def test_with_vision_off_uploads_are_refused_and_jobs_still_read(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    async with serve_live(chat_settings) as server:  # SIGHTLINE_VISION_ENABLED=false
        token = await sign_in(server, account)
        sent = await upload(server, token, jpeg(data.coffee()), ["CLASSIFY"])
        assert sent["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        missing = await gql(
            server,
            token,
            "query($id: ID!) { visionJob(id: $id) { id } }",
            id="00000000-0000-0000-0000-000000000000",
        )
        assert missing["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert (await gql(server, token, "{ visionModels { name } }"))["data"] == {
            "visionModels": []
        }
        off = await features(server, token)
        assert (off["vision"], off["vision.ocr"], off["knowledge.images"]) == (False,) * 3


async def test_a_message_can_attach_an_analysed_image(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any], llm: tuple[Any, str]
) -> None:
    stub, _ = llm
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 30)
    page = Image.new("RGB", (760, 180), "white")
    draw = ImageDraw.Draw(page)
    draw.text((24, 30), "Invoice 4711 is due on Friday", font=font, fill="black")
    draw.text((24, 100), "Contact: ada@example.com", font=font, fill="black")
    async with serve_live(vision_on(chat_settings)) as server:
        token = await sign_in(server, account)
        sent = await upload(server, token, jpeg(np.asarray(page)), ["OCR", "CLASSIFY"])
        job = sent["data"]["analyzeImage"]["id"]
        await results(server.ws_url, token, EVENTS, {"id": job}, "visionJobEvents", timeout=90)

        created = await gql(server, token, 'mutation { createConversation(title: "t") { id } }')
        conversation = created["data"]["createConversation"]["id"]
        send = (
            "mutation($c: ID!, $a: [ID!]) { sendMessage(conversationId: $c, "
            'content: "what is due?", attachments: $a) { run { id } } }'
        )
        started = await gql(server, token, send, c=conversation, a=[job])
        run_id = started["data"]["sendMessage"]["run"]["id"]
        events = await results(
            server.ws_url,
            token,
            "subscription($r: ID!) { runEvents(runId: $r) { __typename "
            "... on ToolCallStarted { name } ... on ToolCallFinished { ok } } }",
            {"r": run_id},
            "runEvents",
        )
        assert {"__typename": "ToolCallStarted", "name": "analyze_image"} in events
        assert {"__typename": "ToolCallFinished", "ok": True} in events
        system = stub.requests[-1]["messages"][0]["content"]
        assert "Invoice 4711" in system
        assert "ada@example.com" not in system  # the OCR text passed the PII rail
        assert "[EMAIL]" in system

        missing = await gql(
            server, token, send, c=conversation, a=["00000000-0000-0000-0000-000000000000"]
        )
        assert missing["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        many = await gql(server, token, send, c=conversation, a=[job] * 5)
        assert many["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_a_spent_compute_budget_refuses_new_jobs(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    plan = chat_settings.limits.default_plan
    chat_settings.limits = chat_settings.limits.model_copy(
        update={"budgets": {plan: {"compute_seconds": BudgetSpec(user_day=1.0)}}}
    )
    async with serve_live(vision_on(chat_settings, compute_hold_s=5.0)) as server:
        token = await sign_in(server, account)
        refused = await upload(server, token, jpeg(data.coffee()), ["CLASSIFY"])
        assert refused["errors"][0]["extensions"]["code"] == "BUDGET_EXCEEDED"


async def test_a_job_costs_money_by_model_version_and_a_spent_money_budget_refuses(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    """A vision task costs its compute-seconds at the settings' price (here 1 per second on
    any device): in the job's results, in `usage(byModel: true)` and in the cost metrics;
    once the money budget is used up, the next job is refused."""
    plan = chat_settings.limits.default_plan
    chat_settings.limits = chat_settings.limits.model_copy(
        update={"budgets": {plan: {"cost": BudgetSpec(user_day=0.000001)}}}
    )
    chat_settings.cost = CostSettings(compute_second_prices={"cpu": 1.0, "cuda": 1.0})
    async with serve_live(vision_on(chat_settings)) as server:
        token = await sign_in(server, account)
        seen = await analyse(server, token, jpeg(data.chelsea()), ["CLASSIFY"])
        assert seen[-1]["__typename"] == "VisionJobCompleted"
        [done] = [e for e in seen if e["__typename"] == "VisionTaskCompleted"]

        by_model = await gql(
            server,
            token,
            "{ usage(days: 1, byModel: true) { resource model version kind amount cost } }",
        )
        [row] = by_model["data"]["usage"]
        assert (row["resource"], row["model"], row["version"], row["kind"]) == (
            "compute_seconds",
            "efficientnet-lite0",
            done["version"],
            "vision",
        )
        assert row["amount"] == pytest.approx(done["ms"] / 1000, abs=1e-3)
        # the model's run, priced at 1 per second: within the task's whole time
        assert 0 < row["cost"] <= row["amount"] + 1e-6
        plain = await gql(server, token, "{ usage(days: 1) { resource model kind cost } }")
        assert plain["data"]["usage"] == [
            {"resource": "compute_seconds", "model": None, "kind": None, "cost": row["cost"]}
        ]

        async with httpx.AsyncClient(base_url=server.http_url) as http:
            metrics = (await http.get("/metrics")).text
        labels = f'kind="vision",model="efficientnet-lite0",tenant="{account["tenant_id"]}"'
        assert f"sightline_model_cost_total{{{labels},version=" in metrics
        assert 'sightline_model_compute_seconds_total{device="' in metrics
        assert 'sightline_budget_remaining_ratio{resource="cost",scope="user_day"' in metrics

        refused = await upload(server, token, jpeg(data.coffee()), ["CLASSIFY"])
        [error] = refused["errors"]
        assert error["extensions"]["code"] == "BUDGET_EXCEEDED"
        assert error["extensions"]["resource"] == "cost"
