//! Elementwise ops: unary math, binary arithmetic (with NumPy-style
//! broadcasting), comparisons, `select` and `convert`.

use crate::graph::core::Tensor;
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};

// ---------------------------------------------------------------- unary

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnaryOp {
    Neg,
    Exp,
    Log,
    Rsqrt,
    Sqrt,
    Tanh,
    Logistic,
    Abs,
    Sin,
    Cos,
    Floor,
    Sign,
    Not,
}

impl UnaryOp {
    fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Logistic => "logistic",
            UnaryOp::Abs => "abs",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Floor => "floor",
            UnaryOp::Sign => "sign",
            UnaryOp::Not => "not",
        }
    }

    fn stablehlo(self) -> &'static str {
        match self {
            UnaryOp::Neg => "stablehlo.negate",
            UnaryOp::Exp => "stablehlo.exponential",
            UnaryOp::Log => "stablehlo.log",
            UnaryOp::Rsqrt => "stablehlo.rsqrt",
            UnaryOp::Sqrt => "stablehlo.sqrt",
            UnaryOp::Tanh => "stablehlo.tanh",
            UnaryOp::Logistic => "stablehlo.logistic",
            UnaryOp::Abs => "stablehlo.abs",
            UnaryOp::Sin => "stablehlo.sine",
            UnaryOp::Cos => "stablehlo.cosine",
            UnaryOp::Floor => "stablehlo.floor",
            UnaryOp::Sign => "stablehlo.sign",
            UnaryOp::Not => "stablehlo.not",
        }
    }
}

#[derive(Debug)]
struct Unary(UnaryOp);

impl Primitive for Unary {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        let ok = match self.0 {
            UnaryOp::Not => x.dtype == DType::Bool || x.dtype.is_integer(),
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign => {
                x.dtype.is_float() || x.dtype.is_signed_integer()
            }
            _ => x.dtype.is_float(),
        };
        if !ok {
            return op_err(self.name(), format!("unsupported operand type {x}"));
        }
        Ok(vec![x.clone()])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, ans, g) = (&ins[0], &outs[0], ct0(cts)?);
        let dx = match self.0 {
            UnaryOp::Neg => g.neg()?,
            UnaryOp::Exp => g.mul(ans)?,
            UnaryOp::Log => g.div(x)?,
            // d/dx x^(-1/2) = -1/2 * x^(-1/2) / x
            UnaryOp::Rsqrt => g.mul(&ans.div(x)?.mul_scalar(-0.5)?)?,
            UnaryOp::Sqrt => g.div(&ans.mul_scalar(2.0)?)?,
            UnaryOp::Tanh => g.mul(&ans.mul(ans)?.neg()?.add_scalar(1.0)?)?,
            UnaryOp::Logistic => g.mul(&ans.mul(&ans.neg()?.add_scalar(1.0)?)?)?,
            UnaryOp::Abs => g.mul(&x.sign()?)?,
            UnaryOp::Sin => g.mul(&x.cos()?)?,
            UnaryOp::Cos => g.mul(&x.sin()?)?.neg()?,
            UnaryOp::Floor | UnaryOp::Sign | UnaryOp::Not => return Ok(vec![None]),
        };
        Ok(vec![Some(dx)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(self.0.stablehlo(), ins, outs, ""))
    }
}

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $method:ident => $op:ident),* $(,)?) => {
        impl Tensor {
            $($(#[$doc])* pub fn $method(&self) -> Result<Tensor> {
                self.g.apply1(Unary(UnaryOp::$op), &[self])
            })*
        }
    };
}

unary_methods! {
    neg => Neg,
    exp => Exp,
    /// Natural logarithm.
    log => Log,
    /// 1 / sqrt(x).
    rsqrt => Rsqrt,
    sqrt => Sqrt,
    tanh => Tanh,
    /// 1 / (1 + exp(-x)), the sigmoid.
    logistic => Logistic,
    abs => Abs,
    sin => Sin,
    cos => Cos,
    floor => Floor,
    sign => Sign,
    /// Logical (bool) or bitwise (integer) not.
    not => Not,
}

// ---------------------------------------------------------------- binary

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    And,
    Or,
}

impl BinaryOp {
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }

    pub(crate) fn stablehlo(self) -> &'static str {
        match self {
            BinaryOp::Add => "stablehlo.add",
            BinaryOp::Sub => "stablehlo.subtract",
            BinaryOp::Mul => "stablehlo.multiply",
            BinaryOp::Div => "stablehlo.divide",
            BinaryOp::Max => "stablehlo.maximum",
            BinaryOp::Min => "stablehlo.minimum",
            BinaryOp::Pow => "stablehlo.power",
            BinaryOp::And => "stablehlo.and",
            BinaryOp::Or => "stablehlo.or",
        }
    }
}

#[derive(Debug)]
struct Binary(BinaryOp);

/// Operands of an elementwise op must agree exactly in type (broadcasting
/// and dtype choices are made explicitly before the primitive).
fn same_types(op: &'static str, a: &TensorType, b: &TensorType) -> Result<()> {
    if a != b {
        return op_err(op, format!("operand types differ: {a} vs {b}"));
    }
    Ok(())
}

impl Primitive for Binary {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        same_types(self.name(), ins[0], ins[1])?;
        let d = ins[0].dtype;
        let ok = match self.0 {
            BinaryOp::And | BinaryOp::Or => d == DType::Bool || d.is_integer(),
            BinaryOp::Pow => d.is_float(),
            _ => d != DType::Bool,
        };
        if !ok {
            return op_err(self.name(), format!("unsupported operand type {}", ins[0]));
        }
        Ok(vec![ins[0].clone()])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (a, b, ans, g) = (&ins[0], &ins[1], &outs[0], ct0(cts)?);
        let (da, db) = match self.0 {
            BinaryOp::Add => (g.clone(), g.clone()),
            BinaryOp::Sub => (g.clone(), g.neg()?),
            BinaryOp::Mul => (g.mul(b)?, g.mul(a)?),
            BinaryOp::Div => (g.div(b)?, g.mul(ans)?.div(b)?.neg()?),
            // Ties split the gradient evenly, as JAX does.
            BinaryOp::Max | BinaryOp::Min => {
                let wins = if self.0 == BinaryOp::Max {
                    a.gt(b)?
                } else {
                    a.lt(b)?
                };
                let share = wins.select(
                    &a.full_like(1.0)?,
                    &a.eq(b)?.select(&a.full_like(0.5)?, &a.zeros_like()?)?,
                )?;
                let da = g.mul(&share)?;
                let db = g.sub(&da)?;
                (da, db)
            }
            BinaryOp::Pow => {
                let da = g.mul(b)?.mul(&a.pow(&b.add_scalar(-1.0)?)?)?;
                // d/db a^b = a^b log a, taken as 0 where a == 0.
                let log_a = a
                    .eq(&a.zeros_like()?)?
                    .select(&a.zeros_like()?, &a.log()?)?;
                (da, g.mul(ans)?.mul(&log_a)?)
            }
            BinaryOp::And | BinaryOp::Or => return Ok(vec![None, None]),
        };
        Ok(vec![Some(da), Some(db)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(self.0.stablehlo(), ins, outs, ""))
    }
}

/// NumPy broadcasting of two tensors to their common shape.
fn broadcast_pair(op: &'static str, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (da, db) = (a.dims(), b.dims());
    if da == db {
        return Ok((a.clone(), b.clone()));
    }
    let rank = da.len().max(db.len());
    let mut out = vec![0i64; rank];
    for i in 0..rank {
        let x = if i + da.len() >= rank {
            da[i + da.len() - rank]
        } else {
            1
        };
        let y = if i + db.len() >= rank {
            db[i + db.len() - rank]
        } else {
            1
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return op_err(op, format!("shapes {da:?} and {db:?} do not broadcast")),
        };
    }
    Ok((a.broadcast_to(&out)?, b.broadcast_to(&out)?))
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $method:ident => $op:ident),* $(,)?) => {
        impl Tensor {
            $($(#[$doc])* pub fn $method(&self, other: &Tensor) -> Result<Tensor> {
                let (a, b) = broadcast_pair(BinaryOp::$op.name(), self, other)?;
                self.g.apply1(Binary(BinaryOp::$op), &[&a, &b])
            })*
        }
    };
}

binary_methods! {
    /// Elementwise sum, with NumPy broadcasting; dtypes must match.
    add => Add,
    sub => Sub,
    mul => Mul,
    div => Div,
    /// Elementwise maximum (gradient split evenly on ties).
    maximum => Max,
    minimum => Min,
    pow => Pow,
    and => And,
    or => Or,
}

impl Tensor {
    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        self.add(&self.scalar_like(v)?)
    }

    pub fn mul_scalar(&self, v: f64) -> Result<Tensor> {
        self.mul(&self.scalar_like(v)?)
    }

    pub fn square(&self) -> Result<Tensor> {
        self.mul(self)
    }
}

// ---------------------------------------------------------------- compare

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug)]
struct Compare(Direction);

impl Primitive for Compare {
    fn name(&self) -> &'static str {
        "compare"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        same_types("compare", ins[0], ins[1])?;
        Ok(vec![ins[0].with_dtype(DType::Bool)])
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None, None])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let dir = format!("{:?}", self.0).to_uppercase();
        let d = ins[0].ty.dtype;
        let kind = if d.is_float() {
            "FLOAT"
        } else if d.is_signed_integer() {
            "SIGNED"
        } else {
            "UNSIGNED"
        };
        let attrs = format!(
            "comparison_direction = #stablehlo<comparison_direction {dir}>, compare_type = #stablehlo<comparison_type {kind}>"
        );
        Ok(generic("stablehlo.compare", ins, outs, &attrs))
    }
}

macro_rules! compare_methods {
    ($($method:ident => $dir:ident),* $(,)?) => {
        impl Tensor {
            $(/// Elementwise comparison (bool result), with broadcasting.
            pub fn $method(&self, other: &Tensor) -> Result<Tensor> {
                let (a, b) = broadcast_pair("compare", self, other)?;
                self.g.apply1(Compare(Direction::$dir), &[&a, &b])
            })*
        }
    };
}

compare_methods! { eq => Eq, ne => Ne, lt => Lt, le => Le, gt => Gt, ge => Ge }

// ---------------------------------------------------------------- is_finite

/// Neither NaN nor infinite (bool result): what the train step's
/// divergence guard asks of the loss, the gradient norm and the update.
#[derive(Debug)]
struct IsFinite;

impl Primitive for IsFinite {
    fn name(&self) -> &'static str {
        "is_finite"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        if !ins[0].dtype.is_float() {
            return op_err(
                "is_finite",
                format!("needs a float operand, got {}", ins[0]),
            );
        }
        Ok(vec![ins[0].with_dtype(DType::Bool)])
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic("stablehlo.is_finite", ins, outs, ""))
    }
}

impl Tensor {
    /// Elementwise: neither NaN nor +-infinity (bool result).
    pub fn is_finite(&self) -> Result<Tensor> {
        self.g.apply1(IsFinite, &[self])
    }
}

// ---------------------------------------------------------------- select

#[derive(Debug)]
struct Select;

impl Primitive for Select {
    fn name(&self) -> &'static str {
        "select"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (p, a, b) = (ins[0], ins[1], ins[2]);
        if p.dtype != DType::Bool {
            return op_err("select", format!("predicate must be bool, got {p}"));
        }
        same_types("select", a, b)?;
        if p.rank() != 0 && p.dims != a.dims {
            return op_err(
                "select",
                format!("predicate {p} does not match operands {a}"),
            );
        }
        Ok(vec![a.clone()])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (p, g) = (&ins[0], ct0(cts)?);
        let zero = g.zeros_like()?;
        Ok(vec![
            None,
            Some(p.select(g, &zero)?),
            Some(p.select(&zero, g)?),
        ])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic("stablehlo.select", ins, outs, ""))
    }
}

impl Tensor {
    /// `self ? on_true : on_false`, elementwise; `self` is bool. All three
    /// broadcast to a common shape.
    pub fn select(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        let (a, b) = broadcast_pair("select", on_true, on_false)?;
        if self.rank() == 0 {
            return self.g.apply1(Select, &[self, &a, &b]);
        }
        let (p, a) = broadcast_pair("select", self, &a)?;
        let b = b.broadcast_to(&a.dims())?;
        self.g.apply1(Select, &[&p, &a, &b])
    }
}

// ---------------------------------------------------------------- convert

#[derive(Debug)]
struct Convert(DType);

impl Primitive for Convert {
    fn name(&self) -> &'static str {
        "convert"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        Ok(vec![ins[0].with_dtype(self.0)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let from = ins[0].dtype();
        if !(from.is_float() && self.0.is_float()) {
            return Ok(vec![None]);
        }
        Ok(vec![Some(ct0(cts)?.convert(from)?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic("stablehlo.convert", ins, outs, ""))
    }
}

impl Tensor {
    /// Element type conversion (a no-op when the dtype already matches).
    pub fn convert(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        self.g.apply1(Convert(dtype), &[self])
    }
}

// ---------------------------------------------------------------- stop_gradient

#[derive(Debug)]
struct StopGradient;

impl Primitive for StopGradient {
    fn name(&self) -> &'static str {
        "stop_gradient"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        Ok(vec![ins[0].clone()])
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None])
    }

    fn emit(&self, _: &mut EmitCx, _: &[Operand], _: &[Operand]) -> Result<String> {
        Ok(String::new())
    }

    fn alias_of(&self) -> Option<usize> {
        Some(0)
    }
}

impl Tensor {
    /// The same value, treated as a constant by differentiation.
    pub fn stop_gradient(&self) -> Result<Tensor> {
        self.g.apply1(StopGradient, &[self])
    }
}
