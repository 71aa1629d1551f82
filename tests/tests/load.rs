//! The kernel object loads, both programs pass the verifier, and every name drain-common
//! promises resolves in it.

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
