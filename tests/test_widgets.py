"""Tests for devis_core/widgets.py: the VideoBrowser redraws on every control and reports what it shows."""

import ipywidgets as widgets
import pytest

from devis_core.data.synthetic import make_synthetic_vis
from devis_core.data.ytvis_format import load_ytvis
from devis_core.widgets import VideoBrowser


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    paths = make_synthetic_vis(str(tmp_path_factory.mktemp("data")), num_videos=(3, 1), frames=(4, 6),
                               size=(48, 64), num_categories=3, objects=(2, 3), seed=0)
    return load_ytvis(paths["train_ann_file"], paths["train_image_root"])


def _present(index, video_id, t):
    """Annotation ids with a mask on frame t, read straight from the JSON records."""
    return tuple(a["id"] for a in index.annotations(video_id) if a["segmentations"][t] is not None)


def test_initial_state(index):
    browser = VideoBrowser(index)
    first = index.video_ids()[0]
    assert browser.video.value == first and browser.frame.value == 0
    assert browser.frame.max == browser.play.max == index.num_frames(first) - 1
    assert browser.shown.video_id == first and browser.shown.frame == 0
    assert browser.shown.ann_ids == _present(index, first, 0)
    assert set(browser.toggles) == {a["id"] for a in index.annotations(first)}
    assert all(isinstance(b, widgets.Checkbox) and b.value for b in browser.toggles.values())
    assert browser.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(browser.widget, widgets.VBox) and browser.image in browser.widget.children
    assert [v for _, v in browser.video.options] == index.video_ids()
    assert all(label.startswith(f"{v}: ") for label, v in browser.video.options)


def test_slider_and_play_redraw(index):
    browser = VideoBrowser(index)
    video = index.video_ids()[0]
    before = browser.image.value
    browser.frame.value = 2
    assert browser.image.value != before
    assert browser.shown.frame == 2 and browser.shown.video_id == video
    assert browser.shown.ann_ids == _present(index, video, 2)
    # The Play button drives the slider (and so the picture).
    browser.play.value = 3
    assert browser.frame.value == 3 and browser.shown.frame == 3
    # Rendering is a function of the state: coming back gives the same bytes.
    browser.frame.value = 0
    assert browser.image.value == before


def test_switching_video_rebuilds_toggles(index):
    browser = VideoBrowser(index)
    first, second = index.video_ids()[:2]
    browser.frame.value = 3
    old_toggles = dict(browser.toggles)
    before = browser.image.value
    browser.video.value = second
    expected = {a["id"] for a in index.annotations(second)}
    assert set(browser.toggles) == expected
    assert expected.isdisjoint(old_toggles)
    assert not any(box in old_toggles.values() for box in browser.toggles.values())
    # The toggle row shows exactly the new checkboxes.
    shown_boxes = [child.children[1] for child in browser._toggle_box.children]
    assert shown_boxes == list(browser.toggles.values())
    assert browser.frame.value == 0 and browser.frame.max == index.num_frames(second) - 1
    assert browser.shown.video_id == second and browser.shown.frame == 0
    assert browser.shown.ann_ids == _present(index, second, 0)
    assert browser.image.value != before
    # The old checkboxes are detached: ticking them no longer redraws.
    current = browser.image.value
    next(iter(old_toggles.values())).value = False
    assert browser.image.value == current


def _frame_with_instance(index):
    for video in index.video_ids():
        for t in range(index.num_frames(video)):
            present = _present(index, video, t)
            if present:
                return video, t, present
    raise AssertionError("the synthetic dataset has no annotated frame")


def test_untick_hides_instance(index):
    video, t, present = _frame_with_instance(index)
    browser = VideoBrowser(index, video_id=video)
    browser.frame.value = t
    before = browser.image.value
    hidden = present[0]
    browser.toggles[hidden].value = False
    assert browser.image.value != before
    assert hidden not in browser.shown.ann_ids
    assert browser.shown.ann_ids == tuple(a for a in present if a != hidden)
    browser.toggles[hidden].value = True
    assert browser.image.value == before and hidden in browser.shown.ann_ids


def test_instance_ids_and_remembered_choices(index):
    video, t, present = _frame_with_instance(index)
    keep = present[0]
    browser = VideoBrowser(index, instance_ids=[keep], video_id=video)
    assert {a for a, box in browser.toggles.items() if box.value} == {keep}
    browser.frame.value = t
    assert browser.shown.ann_ids == (keep,)
    # A choice made on one video survives a trip to another video and back.
    browser.toggles[keep].value = False
    other = next(v for v in index.video_ids() if v != video)
    browser.video.value = other
    browser.video.value = video
    assert browser.toggles[keep].value is False
    assert browser.shown.ann_ids == ()


def test_unknown_video_is_an_error(index):
    with pytest.raises(KeyError, match="12345"):
        VideoBrowser(index, video_id=12345)
