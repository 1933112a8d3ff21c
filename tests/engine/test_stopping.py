from app.engine.stopping import StreamText


def feed_all(st: StreamText, pieces: list[str]) -> tuple[list[str], bool]:
    text, out, stopped = "", [], False
    for piece in pieces:
        text += piece
        stopped = st.feed(text)
        out.append(st.release(final=stopped))
        if stopped:
            break
    return out, stopped


def test_no_stops_releases_everything_at_once() -> None:
    out, stopped = feed_all(StreamText(), ["Hello", " world"])
    assert out == ["Hello", " world"] and not stopped


def test_stop_split_across_pieces_is_trimmed_and_never_leaks() -> None:
    st = StreamText(("END",))
    out, stopped = feed_all(st, ["abc E", "N", "D tail"])
    assert stopped
    assert "".join(out) == "abc "
    assert out == ["abc ", "", ""]  # "E" and "EN" were held back, then dropped with the stop
    assert st.text == "abc "


def test_held_back_prefix_released_when_it_does_not_become_a_stop() -> None:
    st = StreamText(("END",))
    out, stopped = feed_all(st, ["abc E", "x"])
    assert not stopped
    assert out == ["abc ", "Ex"]


def test_earliest_of_several_stops_wins() -> None:
    st = StreamText(("world", "lo w"))
    _, stopped = feed_all(st, ["Hello world"])
    assert stopped and st.text == "Hel"


def test_stop_found_when_it_starts_in_already_released_text() -> None:
    st = StreamText(("ab",))
    out, stopped = feed_all(st, ["xa", "b"])
    # "a" was held back as a possible start of "ab"; the stop then completes across the boundary
    assert stopped and "".join(out) == "x" and st.text == "x"


def test_incomplete_utf8_is_held_until_complete() -> None:
    st = StreamText()
    st.feed("caf\ufffd")
    assert st.release() == "caf"
    st.feed("café")
    assert st.release() == "é"


def test_final_release_flushes_held_text() -> None:
    st = StreamText(("STOP",))
    st.feed("go ST")
    assert st.release() == "go "
    assert st.release(final=True) == "ST"
