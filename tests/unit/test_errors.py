"""The error types every layer shares (fapool/errors.py)."""
import pytest

from fapool.errors import ErrorType, RequestError


def test_error_type_values_are_the_wire_strings():
    assert [t.value for t in ErrorType] == ["invalid_request", "overloaded", "internal"]
    assert ErrorType.of("overloaded") is ErrorType.OVERLOADED and ErrorType.OVERLOADED == "overloaded"
    assert ErrorType.of(None) is ErrorType.INTERNAL and ErrorType.of("no such type") is ErrorType.INTERNAL
    assert [t for t in ErrorType if t.retryable] == [ErrorType.OVERLOADED]


def test_request_error_is_a_value_error_with_a_type():
    with pytest.raises(ValueError, match="the queue is full") as e:
        raise RequestError("the queue is full; retry later", ErrorType.OVERLOADED)
    assert e.value.type is ErrorType.OVERLOADED
    assert RequestError("bad").type is ErrorType.INVALID_REQUEST
    assert RequestError("x", "internal").type is ErrorType.INTERNAL
