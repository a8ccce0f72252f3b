#!/usr/bin/env python3
"""SQLAlchemy against sluice, for the parse-coverage measurement: a migration (create_all of a
small ORM model with a foreign key, an index, a unique constraint and a check), ORM writes and
reads, then reflection (MetaData.reflect and the inspector's per-table calls), then drop_all.
Prints one JSON object of what it saw.

usage: sqlalchemy_client.py URL   (postgresql+psycopg://... or mysql+pymysql://...)
"""
import json
import sys

from sqlalchemy import (CheckConstraint, ForeignKey, Index, MetaData, String, UniqueConstraint,
                        create_engine, inspect, select)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    books: Mapped[list["Book"]] = relationship(back_populates="author")
    __table_args__ = (UniqueConstraint("name", name="sa_author_name_key"),)


class Book(Base):
    __tablename__ = "sa_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    pages: Mapped[int]
    author_id: Mapped[int] = mapped_column(ForeignKey("sa_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")
    __table_args__ = (CheckConstraint("pages > 0", name="sa_book_pages_check"),
                      Index("sa_book_title_idx", "title"))


engine = create_engine(sys.argv[1])
out = {}
Base.metadata.drop_all(engine)
Base.metadata.create_all(engine)
with Session(engine) as s:
    a = Author(name="ursula")
    s.add_all([a, Book(title="the dispossessed", pages=387, author=a),
               Book(title="the lathe of heaven", pages=184, author=a)])
    s.commit()
    out["titles"] = [b.title for b in s.scalars(select(Book).order_by(Book.id))]
    out["author_of_first"] = s.scalars(select(Book)).first().author.name
reflected = MetaData()
reflected.reflect(engine)
out["reflected"] = sorted(t for t in reflected.tables if t.startswith("sa_"))
i = inspect(engine)
out["tables"] = sorted(t for t in i.get_table_names() if t.startswith("sa_"))
out["views"] = len(i.get_view_names())
out["schemas"] = len(i.get_schema_names())
for t in ("sa_author", "sa_book"):
    out[t] = {
        "columns": [c["name"] for c in i.get_columns(t)],
        "pk": i.get_pk_constraint(t)["constrained_columns"],
        "fks": [f["referred_table"] for f in i.get_foreign_keys(t)],
        "indexes": sorted(x["name"] for x in i.get_indexes(t)),
        "unique": sorted(x["name"] for x in i.get_unique_constraints(t)),
        "checks": sorted(x["name"] for x in i.get_check_constraints(t)),
    }
Base.metadata.drop_all(engine)
print(json.dumps(out, sort_keys=True))
