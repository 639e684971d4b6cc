"""The demo model cache: concurrent first runs train once and never collide on a staging name."""

import threading
import time

from moecompress import demo


def test_two_concurrent_first_runs_build_the_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path))
    builds = []

    def fake_build(folder, progress=None):
        from moecompress.api.output import OutputFolder

        builds.append(folder)
        time.sleep(0.3)  # long enough for the other run to arrive while this one trains
        with OutputFolder(folder).staged() as stage:
            (stage / "config.json").write_text("{}")
        return folder

    monkeypatch.setattr(demo, "build_demo_model", fake_build)
    results, errors = [], []

    def first_run():
        try:
            results.append(demo.demo_model())
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builds) == 1
    assert results[0] == results[1] and (results[0] / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [results[0].name]


def test_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MOECOMPRESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / "moecompress"
