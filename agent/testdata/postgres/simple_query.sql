create table t(id int primary key, name text, price numeric, ok bool);
insert into t values (1,'apple',1.5,true),(2,'pear',null,false),(3,'fig',0.25,true);
select id, name, price, ok from t order by id;
select * from nonexistent_table;
do $$ begin raise notice 'hello notice'; end $$;
listen chan1;
notify chan1, 'the payload';
copy (select id, name from t order by id) to stdout;
select;
