// DatabaseMetaData and ResultSetMetaData through any JDBC driver (the PostgreSQL driver, MariaDB
// Connector/J), for the parse-coverage measurement: the catalog queries a driver sends when a
// tool (an IDE, an ORM, a schema browser) asks what is there. Prints "name=rows" per call, or
// "name=error:<SQLSTATE>" when the driver or the server refused it.
//
// usage: java -cp DRIVER.jar JdbcMetadata.java JDBC_URL CATALOG SCHEMA TABLE
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;

public class JdbcMetadata {
    interface Call {
        ResultSet run() throws SQLException;
    }

    static void count(String name, Call call) {
        try (ResultSet r = call.run()) {
            int n = 0;
            while (r.next()) {
                n++;
            }
            System.out.println(name + "=" + n);
        } catch (SQLException e) {
            System.out.println(name + "=error:" + e.getSQLState());
        }
    }

    public static void main(String[] args) throws Exception {
        String catalog = args[1].isEmpty() ? null : args[1];
        String schema = args[2].isEmpty() ? null : args[2];
        String table = args[3];
        try (Connection c = DriverManager.getConnection(args[0])) {
            DatabaseMetaData md = c.getMetaData();
            System.out.println("product=" + md.getDatabaseProductName());
            count("catalogs", md::getCatalogs);
            count("schemas", md::getSchemas);
            count("table_types", md::getTableTypes);
            count("tables", () -> md.getTables(catalog, schema, "%", new String[] {"TABLE", "VIEW"}));
            count("columns", () -> md.getColumns(catalog, schema, table, "%"));
            count("primary_keys", () -> md.getPrimaryKeys(catalog, schema, table));
            count("imported_keys", () -> md.getImportedKeys(catalog, schema, table));
            count("exported_keys", () -> md.getExportedKeys(catalog, schema, table));
            count("index_info", () -> md.getIndexInfo(catalog, schema, table, false, true));
            count("best_row", () -> md.getBestRowIdentifier(catalog, schema, table, DatabaseMetaData.bestRowSession, true));
            count("version_columns", () -> md.getVersionColumns(catalog, schema, table));
            count("table_privileges", () -> md.getTablePrivileges(catalog, schema, table));
            count("column_privileges", () -> md.getColumnPrivileges(catalog, schema, table, "%"));
            count("procedures", () -> md.getProcedures(catalog, schema, "%"));
            count("functions", () -> md.getFunctions(catalog, schema, "%"));
            count("type_info", md::getTypeInfo);
            count("udts", () -> md.getUDTs(catalog, schema, "%", null));
            count("client_info", md::getClientInfoProperties);
            System.out.println("keywords=" + (md.getSQLKeywords().isEmpty() ? 0 : 1));
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("select * from " + table)) {
                ResultSetMetaData rm = r.getMetaData();
                int nullable = 0;
                for (int i = 1; i <= rm.getColumnCount(); i++) {
                    rm.getColumnName(i);
                    rm.getTableName(i);
                    rm.isAutoIncrement(i);
                    if (rm.isNullable(i) == ResultSetMetaData.columnNullable) {
                        nullable++;
                    }
                }
                System.out.println("result_columns=" + rm.getColumnCount() + " nullable=" + nullable);
            }
        }
    }
}
