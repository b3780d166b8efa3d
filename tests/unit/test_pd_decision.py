from app.pd_decision import RequestShape, Route, decide_route, fallback_on_prefill_status


def test_aggregated_mode_never_disaggregates():
    assert decide_route("aggregated", RequestShape()) is Route.AGGREGATED


def test_single_sequence_disaggregates():
    assert decide_route("disaggregated", RequestShape()) is Route.DISAGGREGATED


def test_forking_requests_stay_on_one_engine():
    assert decide_route("disaggregated", RequestShape(n=3)) is Route.AGGREGATED
    assert decide_route("disaggregated", RequestShape(use_beam_search=True)) is Route.AGGREGATED


def test_no_prefill_means_fallback():
    assert decide_route("disaggregated", RequestShape(), prefill_available=False) is Route.FALLBACK


def test_client_errors_are_not_retried_locally():
    assert not fallback_on_prefill_status(400)
    assert not fallback_on_prefill_status(404)
    assert fallback_on_prefill_status(500)
    assert fallback_on_prefill_status(503)
