"""Shadow comparison: the comparisons, and shadow runs that never reach nor slow the caller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backend.config import LifecycleSettings
from backend.lifecycle._series import Series
from backend.lifecycle.shadow import (
    Mirror,
    ShadowLedger,
    ShadowRunner,
    character_error_rate,
    compare_vision,
    cosine_similarity,
    detection_f1,
    edit_distance,
    top1_agreement,
    top_k_overlap,
)
from tests.conftest import scaled


def box(label: str, x: float, y: float, score: float = 0.9, size: float = 10) -> dict[str, Any]:
    return {"label": label, "score": score, "box": {"x": x, "y": y, "width": size, "height": size}}


def test_classification_agrees_on_the_first_label() -> None:
    assert top1_agreement("cat", "cat") == 1.0
    assert top1_agreement("cat", "dog") == 0.0
    live = {"classes": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.1}]}
    assert compare_vision("classify", live, {"classes": [{"label": "cat", "score": 0.5}]}) == {
        "top1_agreement": 1.0
    }
    assert compare_vision("classify", live, {"classes": []}) == {"top1_agreement": 0.0}


def test_detection_f1_matches_boxes_of_the_same_label_by_iou() -> None:
    live = [box("cat", 0, 0), box("dog", 50, 50)]
    assert detection_f1(live, live) == 1.0
    assert detection_f1([], []) == 1.0
    assert detection_f1(live, []) == 0.0
    assert detection_f1(live, [box("dog", 0, 0), box("cat", 50, 50)]) == 0.0  # labels swapped
    assert detection_f1([box("cat", 0, 0)], [box("cat", 6, 0)]) == 0.0  # IoU 0.25
    assert detection_f1([box("cat", 0, 0)], [box("cat", 2, 0)]) == 1.0  # IoU 0.67
    # one live box, two shadow boxes on it: the higher-scored takes it, the other is extra
    two = [box("cat", 1, 0, score=0.5), box("cat", 0, 0, score=0.9)]
    assert detection_f1([box("cat", 0, 0)], two) == pytest.approx(2 / 3)
    assert compare_vision("detect", {"objects": live}, {"objects": live[:1]}) == {
        "detection_f1": pytest.approx(2 / 3)
    }


def test_character_error_rate_between_two_texts() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert character_error_rate("Invoice  total\n42", "Invoice total 42") == 0.0
    assert character_error_rate("Invoice totai 42", "Invoice total 42") == pytest.approx(1 / 16)
    page = "lorem ipsum dolor sit amet " * 100  # a page: linear memory, one row at a time
    assert character_error_rate(page.replace("o", "0", 1), page) == pytest.approx(1 / 2_699)
    assert compare_vision("ocr", {"text": "abcd"}, {"text": "abed"}) == {"cer": 0.25}
    with pytest.raises(ValueError, match="no comparison"):
        compare_vision("segment", {}, {})


def test_answer_similarity_and_top10_overlap() -> None:
    assert cosine_similarity([1, 0], [2, 0]) == pytest.approx(1.0)
    assert cosine_similarity([1, 0], [0, 3]) == pytest.approx(0.0)
    assert cosine_similarity([0, 0], [1, 1]) == 0.0
    ids = [f"doc{i}" for i in range(20)]
    assert top_k_overlap(ids, ids) == 1.0
    assert top_k_overlap(ids, ids[5:]) == 0.5  # top 10 of each share doc5..doc9
    assert top_k_overlap([], []) == 1.0
    assert top_k_overlap(["a"], []) == 0.0


class Live:
    """A live call as the serving path makes it: answer, then mirror to the shadow."""

    def __init__(self, runner: ShadowRunner, shadow: Any) -> None:
        self.runner = runner
        self.shadow = shadow
        self.shadow_started = asyncio.Event()

    async def classify(self) -> dict[str, Any]:
        result = {"classes": [{"label": "cat", "score": 0.9}]}

        async def run_shadow() -> dict[str, Any]:
            self.shadow_started.set()
            return await self.shadow()

        self.runner.mirror(
            Mirror(
                model="clf",
                live_version="1",
                shadow_version="2",
                live_result=result,
                live_latency_s=0.01,
                run=run_shadow,
                compare=lambda a, b: compare_vision("classify", a, b),
            )
        )
        return result


@pytest.fixture
def runner(ledger: ShadowLedger, lifecycle_settings: LifecycleSettings) -> ShadowRunner:
    lifecycle_settings.shadow_timeout_s = scaled(0.5)
    return ShadowRunner(ledger, lifecycle_settings)


async def settled(runner: ShadowRunner) -> None:
    async with asyncio.timeout(scaled(10)):
        while runner.in_flight:
            await asyncio.sleep(0.01)


async def test_a_slow_shadow_neither_delays_nor_reaches_the_caller(
    runner: ShadowRunner, ledger: ShadowLedger
) -> None:
    release = asyncio.Event()

    async def slow() -> dict[str, Any]:
        await release.wait()
        return {"classes": [{"label": "dog", "score": 1.0}]}

    live = Live(runner, slow)
    answer = await live.classify()
    # the caller has its answer (live's) before the shadow even started
    assert answer == {"classes": [{"label": "cat", "score": 0.9}]}
    assert not live.shadow_started.is_set()
    assert runner.in_flight == 1
    await asyncio.wait_for(live.shadow_started.wait(), scaled(5))
    release.set()
    await settled(runner)
    agreement = await ledger.window("clf", "1", "2", 60)
    assert (agreement.compared, agreement.failed) == (1, 0)
    assert agreement.metrics == {"top1_agreement": 0.0}
    assert answer["classes"][0]["label"] == "cat"  # the shadow's result went nowhere else


async def test_failing_and_hanging_shadows_are_counted_not_raised(
    runner: ShadowRunner, ledger: ShadowLedger
) -> None:
    async def fails() -> dict[str, Any]:
        raise RuntimeError("shadow model crashed")

    async def hangs() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    assert (await Live(runner, fails).classify())["classes"][0]["label"] == "cat"
    assert (await Live(runner, hangs).classify())["classes"][0]["label"] == "cat"
    await settled(runner)  # the hanging one ends at shadow_timeout_s
    agreement = await ledger.window("clf", "1", "2", 60)
    assert (agreement.compared, agreement.failed) == (0, 2)
    assert agreement.metrics == {}
    assert agreement.shadow_latency_s is None


async def test_agreement_is_averaged_across_replicas(
    runner: ShadowRunner, ledger: ShadowLedger, series: Series
) -> None:
    async def agrees() -> dict[str, Any]:
        return {"classes": [{"label": "cat", "score": 0.7}]}

    async def disagrees() -> dict[str, Any]:
        return {"classes": [{"label": "dog", "score": 0.7}]}

    for shadow in (agrees, agrees, agrees, disagrees):
        await Live(runner, shadow).classify()
        await settled(runner)
    await series.flush()
    agreement = await ledger.window("clf", "1", "2", 60)
    assert agreement.compared == 4
    assert agreement.metrics == {"top1_agreement": pytest.approx(0.75)}
    assert agreement.live_latency_s == pytest.approx(0.01)
    assert agreement.shadow_latency_s is not None


async def test_shadow_runs_are_bounded_and_cancelled_on_close(
    ledger: ShadowLedger, lifecycle_settings: LifecycleSettings
) -> None:
    lifecycle_settings.shadow_max_in_flight = 1
    runner = ShadowRunner(ledger, lifecycle_settings)
    cancelled = asyncio.Event()

    async def forever() -> dict[str, Any]:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    live = Live(runner, forever)
    await live.classify()
    await live.classify()  # one already in flight: not mirrored, counted
    assert runner.in_flight == 1
    await asyncio.wait_for(live.shadow_started.wait(), scaled(5))
    await runner.close()
    assert cancelled.is_set()
    assert runner.in_flight == 0
    assert not runner.mirror(Mirror("clf", "1", "2", {}, 0.0, forever, lambda a, b: {}))
    agreement = await ledger.window("clf", "1", "2", 60)
    assert (agreement.skipped, agreement.compared, agreement.failed) == (1, 0, 0)
