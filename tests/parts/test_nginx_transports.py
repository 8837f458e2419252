from __future__ import annotations

from sse_lab.parts.nginx import ProxyConfig, nginx_conf


def test_the_websocket_upgrade_config_speaks_http11_and_passes_upgrade_on() -> None:
    conf = nginx_conf(ProxyConfig(websocket_upgrade=True), "http://127.0.0.1:9000", 8080)
    assert "proxy_http_version 1.1;" in conf and "proxy_set_header Upgrade $http_upgrade;" in conf
    assert 'proxy_set_header Connection "upgrade";' in conf and "proxy_pass http://127.0.0.1:9000;" in conf


def test_the_grpc_config_listens_with_http2_and_uses_grpc_pass() -> None:
    conf = nginx_conf(ProxyConfig(grpc=True), "http://127.0.0.1:9000", 8080)
    assert "listen 127.0.0.1:8080 http2;" in conf and "grpc_pass grpc://127.0.0.1:9000;" in conf
    assert "proxy_pass" not in conf


def test_the_defaults_are_unchanged_by_the_transport_options() -> None:
    conf = nginx_conf(ProxyConfig(), "http://127.0.0.1:9000", 8080)
    assert "listen 127.0.0.1:8080;" in conf and "Upgrade" not in conf and "grpc_pass" not in conf
    assert ProxyConfig(websocket_upgrade=True).label == "nginx + WebSocket upgrade"
