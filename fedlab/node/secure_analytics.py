"""Analytics under secure aggregation, on the node: the same partials, leaving only masked.

The node answers exactly what it would answer in the clear, its disclosure rules applied first
(a suppressed cell or refused column contributes 0, and says so in the skeleton as it would in a
plain reply); only then are the figures flattened in the researcher's layout
(:mod:`fedlab.secagg.fa_layout`), encoded exactly (big fixed point) and masked. So each node's
own rules still bound what its figures reveal, and the researcher sees them only summed.
"""

from __future__ import annotations

import msgspec

from fedlab.analytics.messages import FAReply, FARequest
from fedlab.errors import FedlabProtocolError
from fedlab.node.analytics_handler import AnalyticsHandler
from fedlab.node.secagg_handler import SecaggHandler
from fedlab.secagg.fa_layout import FALayout, check_secure_request, skeleton, vectorize
from fedlab.secagg.fixed_point import encode_exact

__all__ = ["answer_secure"]


def answer_secure(request: FARequest, analytics: AnalyticsHandler, secagg: SecaggHandler) -> FAReply:
    """The layout phase's skeleton, or the masked phase's vector, for a request with ``secagg``."""
    secure = request.secagg
    assert secure is not None
    secagg.require(True, "analytics requests")
    check_secure_request(request)  # what cannot be summed is refused here too, not only by the researcher
    plain = analytics(msgspec.structs.replace(request, secagg=None))
    if secure.phase == "layout":
        return skeleton(plain)
    if secure.input is None:
        raise FedlabProtocolError("a masked secure analytics request needs its secagg input (the session and the "
                                  "shares for this node)", code="invalid_field", field="secagg.input")
    try:
        layout = msgspec.msgpack.decode(secure.layout, type=FALayout)
    except msgspec.DecodeError as exc:
        raise FedlabProtocolError(f"the secure analytics layout cannot be read: {exc}", code="invalid_field",
                                  field="secagg.layout") from None
    vector = encode_exact(vectorize(plain, layout))
    secagg.mask(secure.input, vector, "analytics")
    return FAReply(dataset_id=plain.dataset_id, n_rows=0, refused=dict(plain.refused),
                   allowance=dict(plain.allowance), masked=vector.tobytes(), secagg_session=secure.input.session_id)
