import asyncio

from prefect.client.orchestration import get_client


def test_prefect_api_answers(prefect_api):
    async def hello() -> int:
        async with get_client() as client:
            return (await client.hello()).status_code

    assert asyncio.run(hello()) == 200
