"""Read sgpipe's events topic with aiokafka and fastavro alone; print each event as JSON.

    python examples/consumer.py --bootstrap-servers localhost:9092 --schemas schemas/avro

Every record is Avro single-object encoded: C3 01, the writer schema's CRC-64-AVRO fingerprint
(8 bytes, little-endian), the record. Readers resolve any released version to the newest one.
"""

import argparse
import asyncio
import io
import json
import pathlib

from aiokafka import AIOKafkaConsumer
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form


def load_schemas(folder: str) -> tuple[dict[bytes, dict], dict]:
    """Writer schemas by fingerprint, and the newest (highest vN) as the reader schema."""
    paths = sorted(pathlib.Path(folder).glob("email_event.v*.avsc"), key=lambda p: int(p.stem[13:]))
    schemas = [parse_schema(json.loads(path.read_text()), named_schemas={}) for path in paths]
    writers = {
        bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")): schema
        for schema in schemas
    }
    return writers, schemas[-1]


async def main(args: argparse.Namespace) -> None:
    writers, reader = load_schemas(args.schemas)
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        for _ in range(args.max_records or 2**63):
            record = await consumer.getone()
            value = record.value
            if value[:2] != b"\xc3\x01" or value[2:10] not in writers:
                raise SystemExit(f"offset {record.offset}: unknown framing or schema, upgrade")
            writer = writers[value[2:10]]
            event = schemaless_reader(io.BytesIO(value[10:]), writer, reader)
            key = record.key.decode() if record.key is not None else None
            print(json.dumps({"key": key, **event}, default=str), flush=True)
    finally:
        await consumer.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--topic", default="sgpipe.events")
    parser.add_argument("--group", default="email-events-example")
    parser.add_argument("--schemas", default="schemas/avro", help="folder of email_event.v*.avsc")
    parser.add_argument("--max-records", type=int, default=0, help="stop after N (0: never)")
    asyncio.run(main(parser.parse_args()))
