//! The kernel object loads, both programs pass the verifier, every name drain-common
//! promises resolves in it, and every map it has is one drain-common names.

use aya::programs::ProgramType;
use drain_common::{map, prog};
use drain_tests::object::Loaded;

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn both_programs_pass_the_verifier() {
    let mut obj = Loaded::open();
    let _xdp = obj.load_xdp(prog::XDP);
    let _tc = obj.load_tc(prog::TC);
    let xdp = obj.bpf.program(prog::XDP).expect("XDP program resolves");
    assert_eq!(xdp.prog_type(), ProgramType::Xdp);
    let tc = obj.bpf.program(prog::TC).expect("TC program resolves");
    assert_eq!(tc.prog_type(), ProgramType::SchedClassifier);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn every_map_name_resolves_and_is_pinned_in_the_test_dir() {
    let obj = Loaded::open();
    let names: Vec<&str> = obj.bpf.maps().map(|(name, _)| name).collect();
    for name in map::ALL {
        assert!(
            name.len() <= 15,
            "map name {name} is longer than BPF_OBJ_NAME_LEN - 1"
        );
        assert!(
            obj.bpf.map(name).is_some(),
            "map {name} not in the object (it has {names:?})"
        );
        // pinning = ByName: aya pinned it under this test's own directory.
        let pin = obj.pins.path().join(name);
        assert!(pin.exists(), "{} is not pinned", pin.display());
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn pin_dir_is_removed_on_drop() {
    let path = {
        let obj = Loaded::open();
        obj.pins.path().to_owned()
    };
    assert!(!path.exists(), "{} left behind", path.display());
}

/// drain-common promises `map::ALL` is "every map the object defines" (the test above
/// checks each resolves): the RST limiter's map, added with policy reset, must be in it.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn every_map_of_the_object_is_in_map_all() {
    let obj = Loaded::open();
    let names: Vec<&str> = obj.bpf.maps().map(|(n, _)| n).collect();
    assert!(
        names.contains(&map::RST_RL),
        "{} not in the object: {names:?}",
        map::RST_RL
    );
    let missing: Vec<&&str> = names
        .iter()
        // Compiler-made sections (.rodata, .bss, ...) are not maps drain names.
        .filter(|n| !n.starts_with('.') && !map::ALL.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "maps in the object but not in drain_common::map::ALL: {missing:?}"
    );
}
