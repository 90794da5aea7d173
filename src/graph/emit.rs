//! Emission of a traced function as one StableHLO module (generic syntax).
//!
//! Only what the function's outputs need is emitted (dead nodes, such as
//! forward values the backward pass recomputed, are dropped). Donated
//! parameters carry `tf.aliasing_output`, which tells XLA to reuse the input
//! buffer for the matching output.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use super::core::{value_names, BlockId, Graph, GraphState, NodeId, Tensor, ValueId};
use super::dtype::TensorType;
use super::error::{usage, Result};
use super::ops::constant::dense_literal;
use super::primitive::{ManualEdge, Operand};
use super::sharding::{Mesh, Sharding};

/// A traced function ready to be emitted and compiled: parameters are the
/// graph's parameters in declaration order, outputs as given to
/// [`Graph::build`].
#[derive(Clone, Debug)]
pub struct Function {
    pub(crate) graph: Graph,
    pub(crate) outputs: Vec<ValueId>,
    /// (parameter index, output index) pairs whose buffers are shared.
    pub(crate) aliases: Vec<(usize, usize)>,
    pub(crate) num_replicas: usize,
    /// Set for an SPMD program: one program over the mesh's devices
    /// (1 replica x N partitions), partitioned by XLA.
    pub(crate) partitioning: Option<Partitioning>,
    pub(crate) name: String,
}

/// Where an SPMD program's arguments and results lie on its mesh.
#[derive(Clone, Debug)]
pub(crate) struct Partitioning {
    pub mesh: Mesh,
    pub params: Vec<Sharding>,
    pub results: Vec<Sharding>,
}

impl Graph {
    /// Closes tracing: the function returns `outputs`, in order.
    pub fn build(&self, outputs: &[&Tensor]) -> Result<Function> {
        let st = self.st.borrow();
        if st.current() != 0 {
            return usage("build() called inside a loop body");
        }
        let mut ids = Vec::with_capacity(outputs.len());
        for t in outputs {
            if !self.same(&t.g) {
                return usage("build(): output belongs to a different graph");
            }
            if st.values[t.id].block != 0 {
                return usage(
                    "build(): output defined inside a loop body; return it from the loop",
                );
            }
            ids.push(t.id);
        }
        Ok(Function {
            graph: self.clone(),
            outputs: ids,
            aliases: vec![],
            num_replicas: 1,
            partitioning: None,
            name: "main".into(),
        })
    }
}

impl Function {
    /// Number of replicas the module is built for (`mhlo.num_replicas`);
    /// `all_reduce` sums over all of them.
    pub fn with_replicas(mut self, n: usize) -> Self {
        self.num_replicas = n.max(1);
        self
    }

    /// Makes this one SPMD program over `mesh` (`mhlo.num_partitions` =
    /// its devices, one replica): argument i lies as `params[i]`, result j
    /// as `results[j]`, and XLA's partitioner turns the program written on
    /// full shapes into each device's share, with the collectives it
    /// needs.
    pub fn partitioned(
        mut self,
        mesh: &Mesh,
        params: Vec<Sharding>,
        results: Vec<Sharding>,
    ) -> Result<Self> {
        if self.num_replicas != 1 {
            return usage("an SPMD program has one replica; drop with_replicas");
        }
        let (names, ptypes, otypes) = (self.param_names(), self.param_types(), self.output_types());
        if params.len() != ptypes.len() || results.len() != otypes.len() {
            return usage(format!(
                "shardings for {} arguments and {} results of a function with {} and {}",
                params.len(),
                results.len(),
                ptypes.len(),
                otypes.len()
            ));
        }
        let described = names
            .iter()
            .map(|n| format!("argument `{n}`"))
            .zip(params.iter().zip(&ptypes))
            .chain(
                (0..otypes.len())
                    .map(|j| format!("result {j}"))
                    .zip(results.iter().zip(&otypes)),
            );
        for (what, (sharding, ty)) in described {
            if sharding.mesh() != mesh {
                return usage(format!("{what}: its sharding is for another mesh"));
            }
            sharding
                .shard_dims(&ty.dims)
                .map_err(|e| super::error::GraphError::Usage(format!("{what} ({ty}): {e}")))?;
        }
        self.partitioning = Some(Partitioning {
            mesh: mesh.clone(),
            params,
            results,
        });
        Ok(self)
    }

    /// Devices one execution runs on: replicas x partitions.
    pub fn num_devices(&self) -> usize {
        match &self.partitioning {
            Some(p) => p.mesh.devices(),
            None => self.num_replicas,
        }
    }

    /// The block of argument i one device holds (its full type when the
    /// program is not partitioned).
    pub fn param_shard_types(&self) -> Vec<TensorType> {
        blocks(
            self.param_types(),
            self.partitioning.as_ref().map(|p| &p.params[..]),
        )
    }

    /// The block of result j one device holds.
    pub fn output_shard_types(&self) -> Vec<TensorType> {
        blocks(
            self.output_types(),
            self.partitioning.as_ref().map(|p| &p.results[..]),
        )
    }

    /// Module name (shows up in XLA dumps and profiles).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self
    }

    /// Donates the given parameters: each is aliased to the first output of
    /// the same type that is not aliased yet, so XLA updates it in place.
    pub fn donate(mut self, params: &[usize]) -> Result<Self> {
        let (param_types, output_types) = (self.param_types(), self.output_types());
        for &p in params {
            let Some(pty) = param_types.get(p) else {
                return usage(format!(
                    "donate: no parameter {p} (function has {})",
                    param_types.len()
                ));
            };
            if self.aliases.iter().any(|&(q, _)| q == p) {
                continue;
            }
            let taken: HashSet<usize> = self.aliases.iter().map(|&(_, o)| o).collect();
            match (0..output_types.len()).find(|o| !taken.contains(o) && &output_types[*o] == pty) {
                Some(o) => self.aliases.push((p, o)),
                None => {
                    return usage(format!(
                        "donate: parameter {p} ({pty}) has no output of the same type left to alias"
                    ))
                }
            }
        }
        Ok(self)
    }

    pub fn param_names(&self) -> Vec<String> {
        self.graph
            .st
            .borrow()
            .params
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn param_types(&self) -> Vec<TensorType> {
        let st = self.graph.st.borrow();
        st.params
            .iter()
            .map(|&(_, v)| st.values[v].ty.clone())
            .collect()
    }

    pub fn output_types(&self) -> Vec<TensorType> {
        let st = self.graph.st.borrow();
        self.outputs
            .iter()
            .map(|&v| st.values[v].ty.clone())
            .collect()
    }

    /// Indices of donated parameters.
    pub fn donated_params(&self) -> Vec<usize> {
        self.aliases.iter().map(|&(p, _)| p).collect()
    }

    pub fn num_replicas(&self) -> usize {
        self.num_replicas
    }

    /// The StableHLO module text.
    pub fn to_mlir(&self) -> Result<String> {
        let st = self.graph.st.borrow();
        let mut cx = EmitCx::new(&st, self.num_replicas);
        let mut out = String::new();
        let partitions = self.partitioning.as_ref().map_or(1, |p| p.mesh.devices());
        writeln!(
            out,
            "module @{} attributes {{mhlo.num_replicas = {} : i32, mhlo.num_partitions = {partitions} : i32}} {{",
            self.name, self.num_replicas
        )
        .unwrap();
        let sharding = |s: Option<&Sharding>| s.map(Sharding::attribute);
        let params: Vec<String> = st
            .params
            .iter()
            .enumerate()
            .map(|(i, &(_, v))| {
                let alias = self
                    .aliases
                    .iter()
                    .find(|&&(p, _)| p == i)
                    .map(|&(_, o)| format!("tf.aliasing_output = {o} : i32"));
                let on = sharding(self.partitioning.as_ref().map(|p| &p.params[i]));
                let attrs: Vec<String> = on.into_iter().chain(alias).collect();
                format!(
                    "{}: {}{}",
                    cx.name(v),
                    st.values[v].ty.mlir(),
                    braced(&attrs)
                )
            })
            .collect();
        let results: Vec<String> = self
            .outputs
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                let on = sharding(self.partitioning.as_ref().map(|p| &p.results[j]));
                let attrs: Vec<String> = on.into_iter().collect();
                format!("{}{}", st.values[v].ty.mlir(), braced(&attrs))
            })
            .collect();
        writeln!(
            out,
            "  func.func public @main({}) -> ({}) {{",
            params.join(", "),
            results.join(", ")
        )
        .unwrap();
        out.push_str(&cx.block_body(0, &self.outputs, "func.return", 4)?);
        out.push_str("  }\n}\n");
        Ok(out)
    }
}

/// ` {a, b}` for a non-empty attribute list, else nothing.
fn braced(attrs: &[String]) -> String {
    if attrs.is_empty() {
        String::new()
    } else {
        format!(" {{{}}}", attrs.join(", "))
    }
}

/// Each device's block of each of `full` under `shardings` (`full` when
/// there are none; the shardings were checked by Function::partitioned).
fn blocks(full: Vec<TensorType>, shardings: Option<&[Sharding]>) -> Vec<TensorType> {
    let Some(shardings) = shardings else {
        return full;
    };
    full.iter()
        .zip(shardings)
        .map(|(ty, s)| {
            let dims = s
                .shard_dims(&ty.dims)
                .expect("checked by Function::partitioned");
            TensorType::new(ty.dtype, &dims)
        })
        .collect()
}

/// State of one emission: SSA names and counters for fresh names and
/// collective channels.
pub(crate) struct EmitCx<'a> {
    st: &'a GraphState,
    names: HashMap<ValueId, String>,
    fresh: usize,
    channel: usize,
    pub num_replicas: usize,
    /// Values computed inside a manually partitioned region: each
    /// device's own block, which the partitioner leaves alone.
    manual: HashSet<ValueId>,
    /// Set while an op of a manual region is emitted: the constants its
    /// lowering creates enter the region (see [`EmitCx::constant`]).
    in_manual: bool,
}

impl<'a> EmitCx<'a> {
    fn new(st: &'a GraphState, num_replicas: usize) -> Self {
        EmitCx {
            st,
            names: value_names(st),
            fresh: 0,
            channel: 0,
            num_replicas,
            manual: HashSet::new(),
            in_manual: false,
        }
    }

    /// A scalar or splat constant of `ty` for an op's lowering: its lines
    /// and the value. Inside a manual region the constant enters the region
    /// whole ([`enter_whole`]): the MLIR import merges equal constants
    /// across the function, and one constant used both by per-device and
    /// by partitioned ops would get two shardings (XLA's sharding
    /// propagation then aborts).
    pub fn constant(&mut self, ty: &TensorType, value: f64) -> (String, Operand) {
        let c = Operand {
            name: self.fresh(),
            ty: ty.clone(),
        };
        let lit = dense_literal(ty, &ty.dtype.encode(value));
        let line = generic(
            "stablehlo.constant",
            &[],
            std::slice::from_ref(&c),
            &format!("value = {lit} : {}", ty.mlir()),
        );
        if !self.in_manual {
            return (line, c);
        }
        let (enter, inside) = enter_whole(self, &c);
        (format!("{line}\n{enter}"), inside)
    }

    pub fn name(&self, v: ValueId) -> String {
        self.names[&v].clone()
    }

    /// A fresh SSA name for helper values inside an op's lowering.
    pub fn fresh(&mut self) -> String {
        self.fresh += 1;
        format!("%t{}", self.fresh)
    }

    /// A fresh channel id for a collective.
    pub fn next_channel(&mut self) -> usize {
        self.channel += 1;
        self.channel
    }

    fn operand(&self, v: ValueId) -> Operand {
        Operand {
            name: self.name(v),
            ty: self.st.values[v].ty.clone(),
        }
    }

    /// Nodes of `block` needed to compute `results`, in order.
    fn live_nodes(&self, block: BlockId, results: &[ValueId]) -> Vec<NodeId> {
        let mut needed: HashSet<ValueId> = results.iter().copied().collect();
        let mut live = vec![];
        for &n in self.st.blocks[block].nodes.iter().rev() {
            let node = &self.st.nodes[n];
            if node.outputs.iter().any(|o| needed.contains(o)) {
                needed.extend(node.inputs.iter().copied());
                live.push(n);
            }
        }
        live.reverse();
        live
    }

    /// The lines of a block: its live nodes followed by a terminator
    /// returning `results`.
    pub fn block_body(
        &mut self,
        block: BlockId,
        results: &[ValueId],
        terminator: &str,
        indent: usize,
    ) -> Result<String> {
        let mut out = self.node_lines(block, results, indent)?;
        let ops: Vec<Operand> = results.iter().map(|&v| self.operand(v)).collect();
        writeln!(
            out,
            "{}\"{terminator}\"({}) : ({}) -> ()",
            " ".repeat(indent),
            names(&ops),
            types(&ops)
        )
        .unwrap();
        Ok(out)
    }

    /// The live nodes of `block` needed for `results`, one op per line.
    fn node_lines(&mut self, block: BlockId, results: &[ValueId], indent: usize) -> Result<String> {
        let pad = " ".repeat(indent);
        let mut out = String::new();
        // Values that entered the region whole, per block (a block's lines
        // cannot use a definition from a sibling block).
        let mut entered: HashMap<ValueId, Operand> = HashMap::new();
        for n in self.live_nodes(block, results) {
            let node = &self.st.nodes[n];
            let manual_ins = node
                .inputs
                .iter()
                .filter(|v| self.manual.contains(v))
                .count();
            let edge = node.prim.manual_edge();
            let inside = match edge {
                Some(ManualEdge::Enters) if manual_ins > 0 => {
                    return usage(format!(
                        "{}: the value already is in a manual region",
                        node.prim.name()
                    ))
                }
                Some(ManualEdge::Leaves) if manual_ins < node.inputs.len() => {
                    return usage(format!(
                        "{}: the value is not in a manual region",
                        node.prim.name()
                    ))
                }
                Some(ManualEdge::Enters) => true,
                Some(ManualEdge::Leaves) => false,
                None => manual_ins > 0,
            };
            if inside {
                self.manual.extend(node.outputs.iter().copied());
            }
            if let Some(i) = node.prim.alias_of() {
                let src = self.name(node.inputs[i]);
                self.names.insert(node.outputs[0], src);
                continue;
            }
            let mut text = String::new();
            let mut ins: Vec<Operand> = Vec::with_capacity(node.inputs.len());
            for &v in &node.inputs {
                // An op of the region reads a value from outside it (a
                // constant, or one computed from constants): the value
                // enters whole, as shard_map's unmapped inputs do.
                if edge.is_none() && inside && !self.manual.contains(&v) {
                    if let Some(op) = entered.get(&v) {
                        ins.push(op.clone());
                        continue;
                    }
                    let (lines, op) = enter_whole(self, &self.operand(v));
                    text.push_str(&lines);
                    text.push('\n');
                    entered.insert(v, op.clone());
                    ins.push(op);
                } else {
                    ins.push(self.operand(v));
                }
            }
            let outs: Vec<Operand> = node.outputs.iter().map(|&v| self.operand(v)).collect();
            self.in_manual = inside && edge.is_none();
            let emitted = node.prim.clone().emit(self, &ins, &outs);
            self.in_manual = false;
            text.push_str(&emitted?);
            for line in text.lines() {
                out.push_str(&pad);
                out.push_str(line);
                out.push('\n');
            }
        }
        Ok(out)
    }

    /// A child block as a region: `^bb0(args):`, its body and a
    /// `stablehlo.return`. The block's arguments are its own followed by one
    /// per entry of `captures` (values of the parent block): the block's
    /// capture argument where it has one, a fresh unused argument otherwise.
    /// With `pass_captures_through` the region also returns those arguments
    /// unchanged (a loop body keeps its captured state).
    pub fn region(
        &mut self,
        block: BlockId,
        captures: &[ValueId],
        pass_captures_through: bool,
    ) -> Result<String> {
        let b = self.st.blocks[block].clone();
        for &(outer, inner) in &b.captures {
            if self.manual.contains(&outer) {
                self.manual.insert(inner);
            }
        }
        let mut capture_args = Vec::with_capacity(captures.len());
        for &outer in captures {
            let op = match b.captures.iter().find(|(o, _)| *o == outer) {
                Some(&(_, inner)) => self.operand(inner),
                None => Operand {
                    name: self.fresh(),
                    ty: self.st.values[outer].ty.clone(),
                },
            };
            capture_args.push(op);
        }
        let mut args: Vec<Operand> = b.args.iter().map(|&v| self.operand(v)).collect();
        args.extend(capture_args.iter().cloned());
        let mut returned: Vec<Operand> = b.results.iter().map(|&v| self.operand(v)).collect();
        if pass_captures_through {
            returned.extend(capture_args);
        }
        let sig: Vec<String> = args
            .iter()
            .map(|a| format!("{}: {}", a.name, a.ty.mlir()))
            .collect();
        let mut out = format!("^bb0({}):\n", sig.join(", "));
        out.push_str(&self.node_lines(block, &b.results, 2)?);
        writeln!(
            out,
            "  \"stablehlo.return\"({}) : ({}) -> ()",
            names(&returned),
            types(&returned)
        )
        .unwrap();
        Ok(out)
    }
}

/// `%a, %b`
pub(crate) fn names(ops: &[Operand]) -> String {
    ops.iter()
        .map(|o| o.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `tensor<..>, tensor<..>`
pub(crate) fn types(ops: &[Operand]) -> String {
    ops.iter()
        .map(|o| o.ty.mlir())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The left-hand side defining `outs`: `%v3` or `%n7:2`.
pub(crate) fn results_def(outs: &[Operand]) -> String {
    if outs.len() == 1 {
        outs[0].name.clone()
    } else {
        let base = outs[0].name.split('#').next().unwrap_or("%bad");
        format!("{base}:{}", outs.len())
    }
}

/// The result type list: `tensor<..>` or `(tensor<..>, tensor<..>)`.
pub(crate) fn result_types(outs: &[Operand]) -> String {
    if outs.len() == 1 {
        outs[0].ty.mlir()
    } else {
        format!("({})", types(outs))
    }
}

/// One generic-syntax op: `%r = "op"(%a, %b) {attrs} : (ta, tb) -> tr`.
pub(crate) fn generic(op: &str, ins: &[Operand], outs: &[Operand], attrs: &str) -> String {
    let attrs = if attrs.is_empty() {
        String::new()
    } else {
        format!(" {{{attrs}}}")
    };
    format!(
        "{} = \"{op}\"({}){attrs} : ({}) -> {}",
        results_def(outs),
        names(ins),
        types(ins),
        result_types(outs)
    )
}

/// `array<i64: 0, 1>`
pub(crate) fn i64_array(v: &[i64]) -> String {
    if v.is_empty() {
        "array<i64>".into()
    } else {
        format!(
            "array<i64: {}>",
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// `[0, 1]` (for attributes such as dot dimension numbers).
pub(crate) fn i64_list(v: &[i64]) -> String {
    format!(
        "[{}]",
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A reduction region combining two scalars of `ty`'s dtype with `op`
/// (`stablehlo.add`, `stablehlo.maximum`, ...).
pub(crate) fn scalar_region(cx: &mut EmitCx, op: &str, dtype: super::dtype::DType) -> String {
    let t = TensorType::scalar(dtype).mlir();
    let (a, b, r) = (cx.fresh(), cx.fresh(), cx.fresh());
    format!(
        "({{\n^bb0({a}: {t}, {b}: {t}):\n  {r} = \"{op}\"({a}, {b}) : ({t}, {t}) -> {t}\n  \"stablehlo.return\"({r}) : ({t}) -> ()\n}})"
    )
}

/// The two custom calls of a manual region's boundary (JAX's shard_map
/// lowering): `@Sharding` with `first`, then `target` with `second`.
pub(crate) fn manual_pair(
    cx: &mut EmitCx,
    ins: &[Operand],
    outs: &[Operand],
    (first, target, second): (&str, &str, &str),
) -> String {
    let mid = Operand {
        name: cx.fresh(),
        ty: ins[0].ty.clone(),
    };
    let a = generic(
        "stablehlo.custom_call",
        ins,
        std::slice::from_ref(&mid),
        &format!("call_target_name = \"Sharding\", mhlo.sharding = \"{first}\""),
    );
    let b = generic(
        "stablehlo.custom_call",
        &[mid],
        outs,
        &format!("call_target_name = \"{target}\", mhlo.sharding = \"{second}\""),
    );
    format!("{a}\n{b}")
}

/// `v`, whole on every device, as a value of a manual region: its lines
/// and the region's copy.
fn enter_whole(cx: &mut EmitCx, v: &Operand) -> (String, Operand) {
    let inside = Operand {
        name: cx.fresh(),
        ty: v.ty.clone(),
    };
    let lines = manual_pair(
        cx,
        std::slice::from_ref(v),
        std::slice::from_ref(&inside),
        ("{replicated}", "SPMDFullToShardShape", "{manual}"),
    );
    (lines, inside)
}
