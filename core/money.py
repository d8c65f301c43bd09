"""Money on the wire and in the database: decimals with 6 places (SPEC section 4)."""

from decimal import ROUND_HALF_UP, Decimal

SIX_PLACES = Decimal("0.000001")


def quantize_money(value: Decimal) -> Decimal:
    """Rounded half-up to 6 places."""
    return value.quantize(SIX_PLACES, rounding=ROUND_HALF_UP)


def format_money(value: Decimal) -> str:
    """A decimal string with exactly 6 places: `"9.876543"`."""
    return f"{quantize_money(Decimal(value)):f}"
