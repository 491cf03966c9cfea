"""The JSON both query sides answer with: the original example's sellable inventory.

Example::

    SellableInventory(locationId="STL", sku="123123", count=90).model_dump()
    # {"locationId": "STL", "sku": "123123", "count": 90}

A contract like the Avro schemas: the calculator and the Cassandra service answer the
same GET with the same body, so a client can switch between them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class SellableInventory(BaseModel):
    """The sellable count of one sku at one location (the original example's JSON)."""

    locationId: str = Field(examples=["STL"])
    sku: str = Field(examples=["123123"])
    count: int = Field(description="Sellable: on hand minus reserved.", examples=[90])
