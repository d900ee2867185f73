from conftest import config_text, raw_request

async def test_smoke(upstream_factory, proxy_factory):
    stable = await upstream_factory("stable")
    app = await proxy_factory(config_text(stable.url, stable.url))
    port = app.plane.bound_port
    for t in [b'/p/\xc3\xa9', b'/p?q="1"']:
        r = await raw_request(port, b"GET "+t+b" HTTP/1.1\r\nHost: x\r\n\r\n", timeout=1)
        print(t, r)
