from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router_service.engine.stop import StopChecker


def run(stops, pieces):
    checker, emitted = StopChecker(stops), ""
    for piece in pieces:
        text, hit = checker.feed(piece)
        emitted += text
        if hit:
            return emitted, True
    return emitted + checker.flush(), False


def test_cuts_exactly_before_the_stop_string_across_pieces():
    assert run(["END"], ["hello E", "N", "D and more"]) == ("hello ", True)
    assert run(["\n\n", "###"], ["a\n", "b##", "#c"]) == ("a\nb", True)


def test_no_stop_emits_everything():
    assert run(["xyz"], ["ab", "cx", "y"]) == ("abcxy", False)


@given(st.text(alphabet="abc", max_size=40), st.lists(st.text(alphabet="abc", min_size=1, max_size=3),
                                                       min_size=1, max_size=3), st.integers(1, 5))
def test_matches_a_plain_search_at_each_piece(text, stops, piece):
    """Stops are checked as text arrives: the first piece that completes any stop string ends the output."""
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    expected = (text, False)
    for end in range(piece, len(text) + piece, piece):
        seen = text[:end]
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if hits:
            expected = (seen[: min(hits)], True)
            break
    assert run(stops, pieces) == expected
