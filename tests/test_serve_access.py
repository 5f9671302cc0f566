"""Who may use ``ptxseg serve`` (issue 26): a bearer token guards every route but the open
ones (compared in constant time), a ``Host`` header outside the allow-list is refused (DNS
rebinding), a bind beyond loopback needs a token or ``--insecure``, and the token file is read
as a regular file and never echoed."""

from __future__ import annotations

import os
import secrets

import pytest

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from ptxseg.cli import main  # noqa: E402
from ptxseg.serve.access import TOKEN_ENV, Access, allowed_hosts  # noqa: E402
from ptxseg.serve.app import create_app  # noqa: E402
from ptxseg.serve.service import Service  # noqa: E402
from tests.serve_util import LOCAL, served_run, uvicorn_server  # noqa: E402

TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return served_run(tmp_path_factory.mktemp("serve-access"))


@pytest.fixture(scope="module")
def service(run_dir):
    return Service.from_run(run_dir, device="cpu")


def test_the_token_guards_every_route_but_the_open_ones(service, sample_dir):
    png = sorted((sample_dir / "png_images").glob("*.png"))[0].read_bytes()
    app = create_app(service, Access(token=TOKEN))
    with TestClient(app, base_url=LOCAL) as client:
        for method, path in [("GET", "/v1/model"), ("POST", "/v1/predict"),
                             ("GET", "/v1/nothing"), ("GET", "/nothing"),
                             ("GET", "/V1/model"), ("GET", "//v1/model")]:  # fmt: skip
            for headers in ({}, {"Authorization": "Bearer " + TOKEN[:-1] + "x"},
                            {"Authorization": "Basic " + TOKEN}, {"Authorization": TOKEN},
                            {"Authorization": "Bearer"}):  # fmt: skip
                r = client.request(method, path, headers=headers, content=png)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json() == {"detail": "missing or wrong bearer token (Authorization: "
                                              "Bearer <token>)"}  # fmt: skip
        for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
            ok = client.get("/v1/model", headers={"Authorization": f"{scheme} {TOKEN}"})
            assert ok.status_code == 200 and ok.json()["run"] == "run"
        r = client.post("/v1/predict", content=png, params={"images": "false"},
                        headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status_code == 200 and r.json()["width"] == 1024
        # open: the probe and the pages, which hold no model data and no token
        for path in ("/healthz", "/", "/docs", "/openapi.json"):
            r = client.get(path)
            assert r.status_code == 200, path
            assert TOKEN not in r.text and "efficientnet" not in r.text.lower(), path
        assert client.get("/").text.count('data-auth="bearer"') == 1


def test_a_host_header_outside_the_allow_list_is_refused(service):
    """Over a real socket: a browser page of evil.example whose name now points at this
    machine (DNS rebinding) sends Host: evil.example: refused, token or not; the loopback
    names and the --allowed-host values pass."""
    hosts = allowed_hosts("0.0.0.0", ["ptx.hospital.org", "*.example.org", "10.1.2.3"])
    assert hosts == ("127.0.0.1", "localhost", "[::1]", "ptx.hospital.org", "*.example.org",
                     "10.1.2.3")  # fmt: skip
    # the address bound is allowed whatever it is; a wildcard bind adds none
    assert allowed_hosts("127.0.0.5")[3:] == ("127.0.0.5",)
    assert allowed_hosts("::")[3:] == () and allowed_hosts("::1")[3:] == ()
    assert allowed_hosts("FE80::1")[3:] == ("[fe80::1]",)
    with uvicorn_server(create_app(service, Access(hosts=hosts))) as base:
        port = base.rsplit(":", 1)[1]
        for host, status in [("evil.example", 400), (f"evil.example:{port}", 400),
                             ("127.0.0.2", 400), ("example.org", 400), ("10.1.2.4", 400),
                             ("ptx.hospital.org.evil.example", 400),
                             (f"127.0.0.1:{port}", 200), ("localhost", 200), ("[::1]", 200),
                             ("PTX.Hospital.org", 200), ("a.example.org", 200),
                             (f"10.1.2.3:{port}", 200)]:  # fmt: skip
            for path in ("/healthz", "/v1/model", "/"):
                r = httpx.get(base + path, headers={"Host": host}, timeout=30)
                assert r.status_code == status, (host, path, r.text)


def test_the_bind_beyond_loopback_needs_a_token(run_dir, tmp_path, capsys, monkeypatch):
    """One line and exit 2 before the model loads; --insecure serves, saying so; a token file
    that is a FIFO, too short or more than one line is refused without being echoed."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(
        self.config.app))  # fmt: skip
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    args = ["serve", str(run_dir), "--port", "0", "--device", "cpu"]
    assert main([*args, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0: a service reachable from other machines "
                          "needs a token (--token-file FILE or PTXSEG_SERVE_TOKEN; ")  # fmt: skip
    assert err.rstrip("\n").endswith("or --insecure to serve without one") and err.count("\n") == 1
    assert served == []
    assert main([*args, "--host", "0.0.0.0", "--insecure"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].startswith("warning: --insecure: no token, anyone who reaches 0.0.0.0:")
    assert len(served) == 1

    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    assert main([*args, "--host", "0.0.0.0", "--token-file", str(good)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == ("access: the bearer token is needed (all but /healthz and the pages); "
                        "Host names: 127.0.0.1, localhost, [::1]")
    with TestClient(served[-1], base_url=LOCAL) as client:
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).is_success
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main([*args, "--host", "0.0.0.0"]) == 0  # the token from the environment
    with TestClient(served[-1], base_url=LOCAL) as client:
        assert client.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).is_success
    capsys.readouterr()
    assert main([*args, "--token-file", str(good)]) == 2
    assert capsys.readouterr().err == (f"error: --token-file {good} and PTXSEG_SERVE_TOKEN both "
                                       "give a token: use one\n")  # fmt: skip
    monkeypatch.delenv(TOKEN_ENV)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    short, two = tmp_path / "short", tmp_path / "two"
    short.write_text("secret-short\n")
    two.write_text(f"{TOKEN}\n{TOKEN}\n")
    assert main([*args, "--token-file", str(fifo)]) == 2  # no hang on a FIFO
    assert capsys.readouterr().err == f"error: {fifo}: not a regular file (a FIFO)\n"
    for path in (short, two):
        assert main([*args, "--token-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: the token must be one line of at least 16 "
                              "visible ASCII characters, no spaces (")  # fmt: skip
        assert "secret-short" not in err and TOKEN not in err and err.count("\n") == 1
    assert main([*args, "--allowed-host", "evil.example:80"]) == 2
    assert capsys.readouterr().err.startswith("error: --allowed-host 'evil.example:80': a host "
                                              "name or address without port or path")  # fmt: skip
    assert len(served) == 3
