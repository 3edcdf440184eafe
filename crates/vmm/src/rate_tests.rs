use super::*;

#[test]
fn rates_parse_in_bytes_and_bits() {
    assert_eq!(parse_rate("20MiB/s"), Some(20 << 20));
    assert_eq!(parse_rate("20M"), Some(20 << 20));
    assert_eq!(parse_rate("512K/s"), Some(512 << 10));
    assert_eq!(parse_rate("100Mbit/s"), Some(12_500_000));
    assert_eq!(parse_rate("1Gbit"), Some(125_000_000));
    assert_eq!(parse_rate("4096"), Some(4096));
    for bad in [
        "",
        "fast",
        "20XB/s",
        "-1M",
        "1.5M",
        "M",
        "99999999999999999999G",
    ] {
        assert_eq!(parse_rate(bad), None, "{bad}");
    }
}

#[test]
fn values_are_written_back_as_they_read() {
    for n in [20 << 20, 12_500_000, 125_000_000, 4097, 3 << 30, 1000] {
        assert_eq!(parse_rate(&format_rate(n)), Some(n), "{n}");
    }
    assert_eq!(format_rate(20 << 20), "20MiB/s");
    assert_eq!(format_rate(12_500_000), "100Mbit/s");
    for d in [
        Duration::from_millis(100),
        Duration::from_secs(2),
        Duration::from_micros(1500),
    ] {
        assert_eq!(parse_duration(&format_duration(d)), Some(d));
    }
}

#[test]
fn a_spec_maps_to_buckets_holding_the_refill_time_of_their_rate() {
    let mut spec = RateSpec::default();
    spec.set("bandwidth", RateValue::Text("20MiB/s")).unwrap();
    spec.set("burst", RateValue::Text("64MiB")).unwrap();
    spec.set("ops", RateValue::Number(500)).unwrap();
    let config = spec.limiter_config();
    let bw = config.bandwidth.unwrap();
    assert_eq!((bw.size, bw.one_time_burst), (2 << 20, 64 << 20));
    assert_eq!(bw.rate(), 20 << 20);
    let ops = config.ops.unwrap();
    assert_eq!((ops.size, ops.one_time_burst, ops.rate()), (50, 0, 500));
}

#[test]
fn bad_values_name_their_key() {
    let mut spec = RateSpec::default();
    let err = spec.set("bandwidth", RateValue::Text("fast")).unwrap_err();
    assert_eq!(err.key, "bandwidth");
    assert!(err.problem.contains("'fast'"), "{err}");
    assert_eq!(
        spec.set("ops", RateValue::Number(0)).unwrap_err().key,
        "ops"
    );
    assert_eq!(
        spec.set("refill_time", RateValue::Text("1h"))
            .unwrap_err()
            .key,
        "refill_time"
    );
    assert!(spec
        .set("refill_time", RateValue::Text("20s"))
        .unwrap_err()
        .problem
        .contains("outside"));
    assert_eq!(
        spec.set("speed", RateValue::Number(1)).unwrap_err().key,
        "speed"
    );
    let burst_alone = RateSpec {
        burst: Some(1),
        ..RateSpec::default()
    };
    assert_eq!(burst_alone.check().unwrap_err().key, "burst");
    assert_eq!(
        spec,
        RateSpec::default(),
        "a refused value changed the spec"
    );
}

#[test]
fn json_merges_and_null_removes() {
    let base = RateSpec {
        bandwidth: Some(1 << 20),
        ops: Some(100),
        ..RateSpec::default()
    };
    let merged = base
        .merge_json(&json!({"bandwidth": "2MiB/s", "ops": null, "burst": 4096}))
        .unwrap();
    assert_eq!(merged.bandwidth, Some(2 << 20));
    assert_eq!(merged.ops, None);
    assert_eq!(merged.burst, Some(4096));
    assert_eq!(
        merged.to_json(),
        json!({"bandwidth": "2MiB/s", "burst": "4KiB"})
    );
    assert_eq!(base.merge_json(&json!({"ops": -1})).unwrap_err().key, "ops");
    assert_eq!(
        base.merge_json(&json!({"ops": true})).unwrap_err().key,
        "ops"
    );
}

fn two_devices() -> Limits {
    let mut b = LimitsBuilder::default();
    let limited = RateSpec {
        bandwidth: Some(1 << 20),
        ..RateSpec::default()
    };
    b.add("disk0".into(), limited).unwrap();
    b.add("net0-rx".into(), RateSpec::default()).unwrap();
    b.add("net0-tx".into(), RateSpec::default()).unwrap();
    b.build()
}

#[test]
fn a_change_reaches_the_named_device_and_a_nic_name_means_both_directions() {
    let limits = two_devices();
    let reply = limits
        .apply("net0", &json!({"bandwidth": "100Mbit/s"}), false)
        .unwrap();
    assert_eq!(reply.as_array().unwrap().len(), 2);
    let report = limits.report();
    assert_eq!(report[0]["limit"], json!({"bandwidth": "1MiB/s"}));
    assert_eq!(report[1]["limit"], json!({"bandwidth": "100Mbit/s"}));
    assert_eq!(report[2]["limit"], json!({"bandwidth": "100Mbit/s"}));
    limits.apply("net0-tx", &json!({}), true).unwrap();
    assert_eq!(limits.report()[2]["limit"], json!({}));
    assert_eq!(
        limits.report()[1]["limit"],
        json!({"bandwidth": "100Mbit/s"})
    );
}

#[test]
fn a_refused_change_leaves_the_old_limit() {
    let limits = two_devices();
    let err = limits
        .apply(
            "disk0",
            &json!({"bandwidth": "1MiB/s", "ops": "many"}),
            false,
        )
        .unwrap_err();
    assert!(err.to_string().starts_with("rate.ops: "), "{err}");
    limits
        .apply("disk0", &json!({"burst": "1MiB"}), false)
        .unwrap();
    let err = limits
        .apply("disk0", &json!({"bandwidth": null}), false)
        .unwrap_err();
    assert_eq!(err.to_string(), "rate.burst: needs a bandwidth");
    assert_eq!(
        limits.report()[0]["limit"],
        json!({"bandwidth": "1MiB/s", "burst": "1MiB"})
    );
    let err = limits.apply("disk7", &json!({}), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device: no device 'disk7' (this VM has: disk0, net0-rx, net0-tx)"
    );
    assert!(limits.apply("net", &json!({}), false).is_err());
}

#[test]
fn limit_requests_parse_with_field_errors() {
    let map = |v: Value| v.as_object().unwrap().clone();
    let ok = parse_limit_request(&map(
        json!({"op": "limit", "device": "disk0", "rate": {"ops": 5}}),
    ))
    .unwrap();
    assert_eq!(ok.device, "disk0");
    assert!(!ok.replace);
    let err = |v: Value| parse_limit_request(&map(v)).unwrap_err();
    assert_eq!(err(json!({"op": "limit", "rate": {}})), "device: missing");
    assert!(
        err(json!({"op": "limit", "device": "d", "rate": {"ops": "x"}})).starts_with("rate.ops: ")
    );
    assert!(err(json!({"op": "limit", "device": "d", "rate": 5})).starts_with("rate: "));
    assert!(err(json!({"op": "limit", "device": "d", "rate": {}, "x": 1})).contains("'x'"));
}
