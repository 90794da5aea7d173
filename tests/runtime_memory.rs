//! Every PJRT object is freed exactly once: many iterations of transfer,
//! execute (borrowed and donated), download and compile leave RSS flat.
//! One test in its own binary, so no other test allocates meanwhile.

use sharedmoe::runtime::{Arg, Client, CompileOptions};

const ADD: &str = r#"module @add {
  func.func public @main(%a: tensor<64xf32> {tf.aliasing_output = 0 : i32}, %b: tensor<64xf32>) -> tensor<64xf32> {
    %0 = "stablehlo.add"(%a, %b) : (tensor<64xf32>, tensor<64xf32>) -> tensor<64xf32>
    "func.return"(%0) : (tensor<64xf32>) -> ()
  }
}"#;

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn many_iterations_keep_rss_flat() {
    let c = Client::cpu(1).unwrap();
    let dev = &c.devices()[0];
    let exe = c.compile(ADD, &CompileOptions::default()).unwrap();
    let ones = vec![1f32; 64];
    let b = c.buffer_from_host(&ones, &[64], dev).unwrap();
    let step = |i: usize| {
        let a = c.buffer_from_host(&ones, &[64], dev).unwrap();
        let out = if i % 2 == 0 {
            exe.execute(&[&[&a, &b]]).unwrap()
        } else {
            exe.execute_args(vec![vec![Arg::Donated(a), Arg::Borrowed(&b)]])
                .unwrap()
        };
        assert_eq!(out[0][0].to_host::<f32>().unwrap()[63], 2.0);
    };
    for i in 0..500 {
        step(i);
    }
    let before = rss_kib();
    for i in 0..10_000 {
        step(i);
    }
    let after_exec = rss_kib();
    for _ in 0..5 {
        drop(c.compile(ADD, &CompileOptions::default()).unwrap());
    }
    let before_compile = rss_kib();
    for _ in 0..100 {
        drop(c.compile(ADD, &CompileOptions::default()).unwrap());
    }
    let after_compile = rss_kib();
    println!("RSS: {before} KiB after warm-up, {after_exec} KiB after 10,000 executions");
    println!("RSS: {before_compile} KiB before, {after_compile} KiB after 100 compiles");
    assert!(
        after_exec < before + 8 * 1024,
        "executions: RSS grew from {before} to {after_exec} KiB"
    );
    assert!(
        after_compile < before_compile + 8 * 1024,
        "compiles: RSS grew from {before_compile} to {after_compile} KiB"
    );
}
