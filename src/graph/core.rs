//! The traced graph: values, nodes, blocks (regions) and the `Tensor` handle.
//!
//! A [`Graph`] records every op applied to its tensors as a node in the
//! current block. Block 0 is the function body; `while_loop` opens child
//! blocks for its condition and body. A value defined in an enclosing block
//! and used inside a child block is *captured*: the child gets a block
//! argument for it, and the loop threads it through as loop-carried state
//! (closure conversion, as JAX does for `lax.while_loop`). Emitted regions
//! therefore never reference outer SSA values.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use super::dtype::{DType, TensorType};
use super::error::{usage, GraphError, Result};
use super::primitive::Primitive;

pub(crate) type ValueId = usize;
pub(crate) type NodeId = usize;
pub(crate) type BlockId = usize;

/// Where a value comes from.
#[derive(Clone, Debug)]
pub(crate) enum ValueDef {
    /// A function parameter (in `GraphState::params` order).
    Param,
    /// Argument of a child block (loop-carried value or capture).
    BlockArg,
    /// Output `.1` of node `.0`.
    Node(NodeId, usize),
}

#[derive(Clone, Debug)]
pub(crate) struct ValueInfo {
    pub ty: TensorType,
    pub block: BlockId,
    pub def: ValueDef,
}

#[derive(Clone, Debug)]
pub(crate) struct NodeInfo {
    pub prim: Rc<dyn Primitive>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct BlockInfo {
    pub parent: Option<BlockId>,
    /// Block arguments in order (for child blocks).
    pub args: Vec<ValueId>,
    /// Nodes in creation order, which is a topological order.
    pub nodes: Vec<NodeId>,
    /// (value in the parent block, block argument standing for it).
    pub captures: Vec<(ValueId, ValueId)>,
    /// Values the block returns (set when the block is closed).
    pub results: Vec<ValueId>,
}

#[derive(Debug)]
pub(crate) struct GraphState {
    pub values: Vec<ValueInfo>,
    pub nodes: Vec<NodeInfo>,
    pub blocks: Vec<BlockInfo>,
    /// Stack of open blocks; the last is where new nodes go.
    pub open: Vec<BlockId>,
    /// (name, value) of each function parameter, in order.
    pub params: Vec<(String, ValueId)>,
}

impl GraphState {
    pub fn current(&self) -> BlockId {
        *self.open.last().expect("block 0 is never closed")
    }

    fn new_value(&mut self, ty: TensorType, block: BlockId, def: ValueDef) -> ValueId {
        self.values.push(ValueInfo { ty, block, def });
        self.values.len() - 1
    }

    fn is_ancestor(&self, ancestor: BlockId, mut b: BlockId) -> bool {
        loop {
            if b == ancestor {
                return true;
            }
            match self.blocks[b].parent {
                Some(p) => b = p,
                None => return false,
            }
        }
    }

    /// The value standing for `v` inside block `b`: `v` itself when it is
    /// defined there, else a (possibly new) capture argument.
    pub fn import(&mut self, v: ValueId, b: BlockId) -> Result<ValueId> {
        let home = self.values[v].block;
        if home == b {
            return Ok(v);
        }
        if !self.is_ancestor(home, b) {
            return usage(format!(
                "a value of type {} defined inside a loop body or condition is used outside it; \
                 return it from the loop instead",
                self.values[v].ty
            ));
        }
        let parent = self.blocks[b].parent.expect("non-root block has a parent");
        let outer = self.import(v, parent)?;
        if let Some(&(_, inner)) = self.blocks[b].captures.iter().find(|(o, _)| *o == outer) {
            return Ok(inner);
        }
        let ty = self.values[v].ty.clone();
        let inner = self.new_value(ty, b, ValueDef::BlockArg);
        self.blocks[b].captures.push((outer, inner));
        Ok(inner)
    }
}

/// A computation being traced. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Graph {
    pub(crate) st: Rc<RefCell<GraphState>>,
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.st.borrow();
        write!(
            f,
            "Graph({} values, {} nodes)",
            st.values.len(),
            st.nodes.len()
        )
    }
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    pub fn new() -> Graph {
        let st = GraphState {
            values: vec![],
            nodes: vec![],
            blocks: vec![BlockInfo::default()],
            open: vec![0],
            params: vec![],
        };
        Graph {
            st: Rc::new(RefCell::new(st)),
        }
    }

    pub(crate) fn same(&self, other: &Graph) -> bool {
        Rc::ptr_eq(&self.st, &other.st)
    }

    pub(crate) fn tensor(&self, id: ValueId) -> Tensor {
        Tensor {
            g: self.clone(),
            id,
        }
    }

    /// Declares the next function parameter. Parameters belong to the
    /// function body, so they cannot be declared inside a loop.
    pub fn param(&self, name: &str, ty: TensorType) -> Result<Tensor> {
        let mut st = self.st.borrow_mut();
        if st.current() != 0 {
            return usage(format!(
                "parameter `{name}` declared inside a loop body; declare it before the loop"
            ));
        }
        if let Some(d) = ty.dims.iter().find(|&&d| d < 0) {
            return usage(format!(
                "parameter `{name}` has a negative dimension {d} in {ty}"
            ));
        }
        let id = st.new_value(ty, 0, ValueDef::Param);
        st.params.push((name.to_string(), id));
        drop(st);
        Ok(self.tensor(id))
    }

    /// Records `prim` applied to `inputs` in the current block and returns
    /// its outputs. The primitive's shape rule validates the operands first,
    /// so nothing ill-typed is ever recorded.
    pub(crate) fn apply(&self, prim: impl Primitive, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        for t in inputs {
            if !self.same(&t.g) {
                return usage(format!(
                    "{}: operand belongs to a different graph",
                    prim.name()
                ));
            }
        }
        let mut st = self.st.borrow_mut();
        let block = st.current();
        let mut ins = Vec::with_capacity(inputs.len());
        for t in inputs {
            ins.push(st.import(t.id, block)?);
        }
        let in_types: Vec<&TensorType> = ins.iter().map(|&v| &st.values[v].ty).collect();
        let out_types = prim.out_types(&in_types)?;
        let node = st.nodes.len();
        let outputs: Vec<ValueId> = out_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| st.new_value(ty, block, ValueDef::Node(node, i)))
            .collect();
        st.nodes.push(NodeInfo {
            prim: Rc::new(prim),
            inputs: ins,
            outputs: outputs.clone(),
        });
        st.blocks[block].nodes.push(node);
        drop(st);
        Ok(outputs.into_iter().map(|id| self.tensor(id)).collect())
    }

    /// Like [`apply`](Self::apply) for single-output primitives.
    pub(crate) fn apply1(&self, prim: impl Primitive, inputs: &[&Tensor]) -> Result<Tensor> {
        let mut outs = self.apply(prim, inputs)?;
        debug_assert_eq!(outs.len(), 1);
        Ok(outs.remove(0))
    }

    /// Opens a child block of the current one with arguments of the given
    /// types, runs `f` inside it and closes it with `f`'s results.
    pub(crate) fn in_child_block<F>(&self, arg_types: &[TensorType], f: F) -> Result<BlockId>
    where
        F: FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    {
        let (b, args) = {
            let mut st = self.st.borrow_mut();
            let parent = st.current();
            st.blocks.push(BlockInfo {
                parent: Some(parent),
                ..Default::default()
            });
            let b = st.blocks.len() - 1;
            let args: Vec<ValueId> = arg_types
                .iter()
                .map(|ty| st.new_value(ty.clone(), b, ValueDef::BlockArg))
                .collect();
            st.blocks[b].args = args.clone();
            st.open.push(b);
            (b, args)
        };
        let arg_tensors: Vec<Tensor> = args.iter().map(|&v| self.tensor(v)).collect();
        let result = f(&arg_tensors);
        let mut st = self.st.borrow_mut();
        st.open.pop();
        let results = result?;
        let mut ids = Vec::with_capacity(results.len());
        for t in &results {
            if !self.same(&t.g) {
                return usage("loop block returned a tensor of a different graph");
            }
            ids.push(st.import(t.id, b)?);
        }
        st.blocks[b].results = ids;
        Ok(b)
    }

    /// Number of parameters declared so far.
    pub fn num_params(&self) -> usize {
        self.st.borrow().params.len()
    }
}

/// A traced value: a handle to one output of one node (or a parameter) of a
/// [`Graph`], with a static type. Ops on tensors record new nodes.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) g: Graph,
    pub(crate) id: ValueId,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor(%{}: {})", self.id, self.ty())
    }
}

impl Tensor {
    pub fn graph(&self) -> &Graph {
        &self.g
    }

    pub fn ty(&self) -> TensorType {
        self.g.st.borrow().values[self.id].ty.clone()
    }

    pub fn dtype(&self) -> DType {
        self.g.st.borrow().values[self.id].ty.dtype
    }

    pub fn dims(&self) -> Vec<i64> {
        self.g.st.borrow().values[self.id].ty.dims.clone()
    }

    pub fn rank(&self) -> usize {
        self.g.st.borrow().values[self.id].ty.dims.len()
    }

    /// Size of dimension `d`; negative `d` counts from the end.
    pub fn dim(&self, d: i64) -> Result<i64> {
        let dims = self.dims();
        let axis = normalize_axis(d, dims.len(), "dim")?;
        Ok(dims[axis])
    }
}

/// Resolves a possibly negative axis against `rank`.
pub(crate) fn normalize_axis(axis: i64, rank: usize, op: &'static str) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(GraphError::Op {
            op,
            msg: format!("axis {axis} is out of range for rank {rank}"),
        });
    }
    Ok(a as usize)
}

/// Position of each value's definition, used by emission and autodiff.
pub(crate) fn value_names(st: &GraphState) -> HashMap<ValueId, String> {
    let mut names = HashMap::with_capacity(st.values.len());
    for (id, v) in st.values.iter().enumerate() {
        let name = match v.def {
            ValueDef::Node(n, i) if st.nodes[n].outputs.len() > 1 => format!("%n{n}#{i}"),
            _ => format!("%v{id}"),
        };
        names.insert(id, name);
    }
    names
}
