"""Results retention on Redis (chain/retention.py): the result keys get an expiry once, other
keys and keys that already have one are left alone; Redis still never evicts."""

from __future__ import annotations

import pytest
import redis
from pydantic import SecretStr

from chain.retention import sweep_results
from chain.settings import ChainSettings
from localnode.redis import RedisServer

pytestmark = pytest.mark.integration


def test_result_keys_expire_after_the_retention(redis_server: RedisServer) -> None:
    url = redis_server.url(3)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        for i in range(1200):  # more than one pipeline batch
            client.set(f"wnm-build-{i:04d}", b"{}")
        client.set("wnm-published-x", b"{}")
        client.set("wnm-published-short", b"{}", ex=60)
        client.set("prefect-block-or-other", b"{}")
        settings = ChainSettings(_env_file=None, results_url=SecretStr(url),
                                 results_retention_days=2)
        assert sweep_results(settings) == 1201
        assert 2 * 86400 - 60 < client.ttl("wnm-build-0000") <= 2 * 86400
        assert 2 * 86400 - 60 < client.ttl("wnm-published-x") <= 2 * 86400
        assert client.ttl("wnm-published-short") <= 60  # its own expiry kept
        assert client.ttl("prefect-block-or-other") == -1
        assert sweep_results(settings) == 0  # a second sweep does not push expiries back
    finally:
        client.close()
